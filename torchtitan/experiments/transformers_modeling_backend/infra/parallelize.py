"""The parallel stack of the transformers modeling backend: the generic dense-decoder helpers with the
Hugging Face module names (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ..., `lm_head`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from torchtitan.config.errors import ConfigError
from torchtitan.distributed.context_parallel import ContextParallel
from torchtitan.distributed.dense_parallelize import DenseModuleNames, parallelize_dense
from torchtitan.distributed.module_paths import block_container
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

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


# The transformers attention implementation that context parallelism selects (registered on first use).
CP_ATTENTION = "torchtitan_context_parallel"


def _cp_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
    scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: causal attention by the module's `cp_attention` (q/k/v
    [batch, heads, local_seq, head_dim]); the output in transformers' layout [batch, local_seq, heads, head_dim]."""
    if attention_mask is not None or dropout:
        raise ValueError("context-parallel attention takes no attention mask and no dropout")
    return module.cp_attention(query, key, value, scale=scaling).transpose(1, 2).contiguous(), None


def apply_hf_cp(model: nn.Module, cp: ContextParallel) -> None:
    """Context parallelism for transformers decoder layers: each `self_attn` gets a `cp_attention` child,
    and the model's attention implementation becomes one that calls it (the layers' own q/k/v
    projections, RoPE and output projection stay as they are)."""
    from transformers import AttentionInterface

    if getattr(model.config, "attention_dropout", 0.0):
        raise ConfigError(
            f"--parallelism.context_parallel_degree={cp.cp}: the model's config has attention_dropout="
            f"{model.config.attention_dropout}, which context-parallel attention does not apply; set it to 0 "
            "in config.json or use context_parallel_degree 1"
        )
    AttentionInterface.register(CP_ATTENTION, _cp_attention_forward)
    for block in block_container(model, HF_MODULES.blocks).children():
        block.self_attn.register_module("cp_attention", cp.attention())
        block.self_attn.config._attn_implementation = CP_ATTENTION
    logger.info(f"Applied {cp.summary()} to the transformers attention")


def parallelize_hf_transformers(model: nn.Module, parallel_dims: ParallelDims, job_config: Any) -> nn.Module:
    """TP(+SP, loss parallel) -> CP -> AC -> per-block compile -> FSDP2/HSDP/DDP on an HFTransformerModel (or a
    pipeline stage of one: a tied head on another stage than the embedding is kept equal to it by the
    pipeline's TiedParameters)."""
    if parallel_dims.pp_enabled and parallel_dims.sequence_parallel_enabled:
        raise ConfigError(
            f"--parallelism.pipeline_parallel_degree={parallel_dims.pp} with tensor_parallel_degree="
            f"{parallel_dims.tp} and sequence parallel: a transformers stage without the embedding would get "
            "only its sequence shard (and wrong positions); pass --parallelism.disable_sequence_parallel"
        )
    return parallelize_dense(model, parallel_dims, job_config, hf_module_names(model), apply_cp_fn=apply_hf_cp)
