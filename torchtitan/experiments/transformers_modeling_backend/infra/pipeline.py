"""Pipeline parallelism for the transformers modeling backend: the generic stage splitting and scheduling
with the Hugging Face module names (`model.embed_tokens`, `model.layers.N`, `model.norm`, `lm_head`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from torchtitan.config.errors import ConfigError
from torchtitan.distributed.pipeline_parallel import pipeline_model
from torchtitan.experiments.transformers_modeling_backend.infra.parallelize import HF_MODULES

HF_INPUT_MODULES = (HF_MODULES.embeddings,)
HF_OUTPUT_MODULES = (HF_MODULES.final_norm, HF_MODULES.output)


def pipeline_hf_transformers(
    model: nn.Module, parallel_dims: Any, job_config: Any, device: torch.device, parallelize_fn: Callable,
    loss_fn: Callable,
) -> tuple[Any, list[nn.Module], bool, bool]:
    """Split a (meta) HFTransformerModel into this rank's pipeline stages; see `pipeline_model`. Models with
    tied input/output embeddings are refused (the two stages would each own and update a copy)."""
    if model.config.tie_word_embeddings:
        raise ConfigError(
            f"--parallelism.pipeline_parallel_degree={parallel_dims.pp}: hf_transformers.model="
            f"{job_config.hf_transformers.model!r} ties its input and output embeddings (tie_word_embeddings), "
            "which pipeline parallelism does not support; use pipeline_parallel_degree 1 (FSDP/TP instead)"
        )
    return pipeline_model(
        model, parallel_dims, job_config, device, parallelize_fn, loss_fn,
        input_modules=HF_INPUT_MODULES, output_modules=HF_OUTPUT_MODULES, layers_attr=HF_MODULES.blocks,
    )
