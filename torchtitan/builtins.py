"""The built-in registrations, made by the composition roots (the trainer, the dry run, the scripts).

Importing this module registers the built-in model families (TrainSpecs) and model converters, so that
`torchtitan.protocols`, which holds the registries, never imports the packages that register into it.
"""

import torchtitan.components.quantization  # noqa: F401
import torchtitan.models  # noqa: F401
import torchtitan.experiments.transformers_modeling_backend  # noqa: F401
