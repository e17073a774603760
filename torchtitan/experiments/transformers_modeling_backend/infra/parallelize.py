"""The parallel stack of the transformers modeling backend: the generic dense-decoder helpers with the
Hugging Face module names (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ..., `lm_head`)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from torchtitan.config.errors import ConfigError
from torchtitan.distributed.dense_parallelize import DenseModuleNames, parallelize_dense
from torchtitan.distributed.module_paths import block_container
from torchtitan.distributed.parallel_dims import ParallelDims

HF_MODULES = DenseModuleNames(
    embeddings="model.embed_tokens",
    final_norm="model.norm",
    output="lm_head",
    blocks="model.layers",
    attention="self_attn",
    attention_norm="input_layernorm",
    wq="self_attn.q_proj",
    wk="self_attn.k_proj",
    wv="self_attn.v_proj",
    wo="self_attn.o_proj",
    feed_forward="mlp",
    ffn_norm="post_attention_layernorm",
    w1="mlp.gate_proj",
    w2="mlp.down_proj",
    w3="mlp.up_proj",
    attention_input_kwarg="hidden_states",  # HF decoder layers call self_attn(hidden_states=...)
)


def hf_module_names(model: nn.Module) -> DenseModuleNames:
    """HF_MODULES completed for this model (an HFTransformerModel or a transformers causal LM): its q/k
    norms (Qwen3) and whether the output head is tied."""
    config = model.config
    blocks = block_container(model, HF_MODULES.blocks)
    first_attention = next((getattr(block, "self_attn", None) for block in blocks.children()), None)
    head_norms = tuple(
        f"self_attn.{name}" for name in ("q_norm", "k_norm") if hasattr(first_attention, name)
    )
    return HF_MODULES._replace(head_norms=head_norms, tied_output=bool(config.tie_word_embeddings))


def parallelize_hf_transformers(model: nn.Module, parallel_dims: ParallelDims, job_config: Any) -> nn.Module:
    """TP(+SP, loss parallel) -> AC -> per-block compile -> FSDP2/HSDP/DDP on an HFTransformerModel (or a
    pipeline stage of one: a tied head on another stage than the embedding is kept equal to it by the
    pipeline's TiedParameters)."""
    if parallel_dims.pp_enabled and parallel_dims.sequence_parallel_enabled:
        raise ConfigError(
            f"--parallelism.pipeline_parallel_degree={parallel_dims.pp} with tensor_parallel_degree="
            f"{parallel_dims.tp} and sequence parallel: a transformers stage without the embedding would get "
            "only its sequence shard (and wrong positions); pass --parallelism.disable_sequence_parallel"
        )
    return parallelize_dense(model, parallel_dims, job_config, hf_module_names(model))
