"""The `[hf_transformers]` config section of the transformers modeling backend.

The section is part of the built-in schema, so `--hf_transformers.model` works on its own. torchtitan
0.2 users pass `--job.custom_config_module torchtitan.experiments.transformers_modeling_backend.job_config`;
that merges this module's `JobConfig` (the same section) and changes nothing.
"""

from dataclasses import dataclass

from torchtitan.config.job_config import HFTransformers, section

__all__ = ["HFTransformers", "JobConfig"]


@dataclass
class JobConfig:
    hf_transformers: HFTransformers = section(HFTransformers, "Hugging Face transformers modeling backend")
