"""Built-in model families; importing this package registers their TrainSpecs."""

import torchtitan.models.llama3  # noqa: F401
