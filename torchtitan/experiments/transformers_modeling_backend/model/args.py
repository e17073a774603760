"""Arguments of the transformers modeling backend: a Hugging Face config, optionally shrunk.

`HFTransformerModelArgs(titan_dense_args=...).update_from_config(job_config)` loads the config of
`[hf_transformers] model` with `AutoConfig.from_pretrained`, applies the non-None sizes of
`TitanDenseModelArgs` to it (the "debugmodel" flavor shrinks the architecture this way; "full" keeps the
HF config as is) and mirrors the result in torchtitan-style fields (dim, n_layers, n_heads, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from torchtitan.config.errors import ConfigError
from torchtitan.protocols.model import BaseModelArgs, dense_nparams_and_flops

# Causal-LM classes whose decoder layers this backend's forward and TP plan know (module names
# model.embed_tokens / model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj} / model.norm / lm_head).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# TitanDenseModelArgs field -> the Hugging Face config attribute it overrides.
_HF_NAMES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "ffn_hidden_dim": "intermediate_size",
    "vocab_size": "vocab_size",
    "norm_eps": "rms_norm_eps",
}


@dataclass
class TitanDenseModelArgs:
    """torchtitan-style sizes applied over the Hugging Face config; None keeps the config's value."""

    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_hidden_dim: int | None = None
    vocab_size: int | None = None
    norm_eps: float | None = None


def _model_key(source: str) -> str:
    return f"hf_transformers.model={source!r}"


def load_hf_config(source: str) -> Any:
    """`AutoConfig.from_pretrained(source)` (a local folder, or a hub id through the HF cache), with the
    failures a user can fix turned into one-line ConfigErrors."""
    from transformers import AutoConfig

    if not source:
        raise ConfigError(
            "hf_transformers.model is empty; set it to a local folder with config.json (or a hub id in the "
            "Hugging Face cache) when model.name is transformers_modeling_backend"
        )
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise ConfigError(f"{_model_key(source)} is a folder without config.json; pass a folder saved by save_pretrained")
    if not os.path.isdir(source) and (source.startswith((".", "/", "~")) or os.path.exists(source)):
        raise ConfigError(f"{_model_key(source)} is not a folder; pass a local folder that holds config.json")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        if os.path.isdir(source):
            raise ConfigError(
                f"{_model_key(source)}: config.json is not a transformers config this version knows "
                f"({type(e).__name__}); supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
            ) from None
        raise ConfigError(
            f"{_model_key(source)} is not in the local Hugging Face cache and the hub cannot be reached; "
            "pass a local folder that holds config.json (e.g. from scripts/download_hf_assets.py)"
        ) from None


@dataclass
class HFTransformerModelArgs(BaseModelArgs):
    """The Hugging Face config to build (`hf_config`, set by `update_from_config`) and its sizes."""

    titan_dense_args: TitanDenseModelArgs = field(default_factory=TitanDenseModelArgs)
    hf_config: Any = None
    architecture: str = ""
    dim: int = 0
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    norm_eps: float = 0.0
    max_seq_len: int = 0
    tie_word_embeddings: bool = False

    def update_from_config(self, job_config: Any, tokenizer: Any = None) -> HFTransformerModelArgs:
        """Load the HF config of `job_config.hf_transformers.model`, apply the flavor's sizes, check it
        against the job (architecture, sequence length, tokenizer); returns self."""
        source = job_config.hf_transformers.model
        config = load_hf_config(source)
        architectures = getattr(config, "architectures", None) or [f"{config.model_type} model without `architectures`"]
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{_model_key(source)} is a {architecture}, which the transformers modeling backend does not "
                f"support; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self._apply_overrides(config)
        config.use_cache = False
        self.hf_config = config
        self.architecture = architecture
        self.dim, self.n_layers = config.hidden_size, config.num_hidden_layers
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or self.dim // self.n_heads
        self.vocab_size, self.norm_eps = config.vocab_size, config.rms_norm_eps
        self.tie_word_embeddings = bool(config.tie_word_embeddings)
        self.max_seq_len = job_config.training.seq_len
        self._check_attention(source, config)
        if tokenizer is not None and tokenizer.vocab_size > self.vocab_size:
            raise ConfigError(
                f"model.hf_assets_path={job_config.model.hf_assets_path!r}: tokenizer has {tokenizer.vocab_size} "
                f"tokens but {_model_key(source)} embeds only {self.vocab_size}; use the model's own tokenizer"
            )
        return self

    def _apply_overrides(self, config: Any) -> None:
        overrides = {f.name: getattr(self.titan_dense_args, f.name) for f in fields(self.titan_dense_args)}
        for name, value in overrides.items():
            if value is not None:
                setattr(config, _HF_NAMES[name], value)
        if overrides["dim"] is not None or overrides["n_heads"] is not None:
            config.head_dim = config.hidden_size // config.num_attention_heads
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:  # one entry per layer (Qwen2/Qwen3)
            config.layer_types = list(layer_types)[: config.num_hidden_layers]

    def _check_attention(self, source: str, config: Any) -> None:
        """The forward runs causal SDPA without a mask: refuse what needs one (a sliding window shorter
        than the sequence) and head layouts that do not divide."""
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{_model_key(source)}: num_attention_heads {self.n_heads} is not a multiple of "
                f"num_key_value_heads {self.n_kv_heads}; fix the flavor's n_heads/n_kv_heads"
            )
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        sliding = window is not None and (layer_types is None or "sliding_attention" in layer_types)
        if sliding and window < self.max_seq_len:
            raise ConfigError(
                f"{_model_key(source)} uses sliding-window attention (window {window}) but "
                f"training.seq_len={self.max_seq_len} is longer; use --training.seq_len {window} or less"
            )

    def tp_head_counts(self) -> dict[str, int]:
        return {"num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads}

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        return dense_nparams_and_flops(model, self.n_layers, self.n_heads, self.head_dim, seq_len)
