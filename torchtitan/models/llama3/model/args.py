"""Hyper-parameters of the Llama 3 family."""

from dataclasses import dataclass
from typing import Any

from torch import nn

from torchtitan.config.errors import ConfigError
from torchtitan.protocols.model import BaseModelArgs, dense_nparams_and_flops


@dataclass
class RoPEScalingArgs:
    """Llama 3.1 RoPE frequency scaling (long-context extension)."""

    scaling_factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class TransformerModelArgs(BaseModelArgs):
    """Sizes of a Llama 3 model. `vocab_size=-1` means: take it from the tokenizer."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = -1
    multiple_of: int = 256  # the FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RoPEScalingArgs | None = None  # None: plain RoPE
    max_seq_len: int = 131072

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * -(-hidden // self.multiple_of)

    def update_from_config(self, job_config: Any, tokenizer: Any = None) -> None:
        """Set max_seq_len from the job (and validation) sequence length and an unset vocabulary
        size from the tokenizer; reject head layouts and vocabularies the model cannot serve."""
        flavor = f"model.flavor={job_config.model.flavor!r}"
        if self.dim % self.n_heads or self.n_heads % self.kv_heads:
            raise ConfigError(
                f"{flavor}: dim {self.dim}, n_heads {self.n_heads}, n_kv_heads {self.kv_heads} must "
                "satisfy dim % n_heads == 0 and n_heads % n_kv_heads == 0; fix the flavor's args"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{flavor}: head_dim {self.head_dim} must be even for RoPE; fix dim or n_heads")
        self.max_seq_len = job_config.training.seq_len
        if job_config.validation.enable:
            self.max_seq_len = max(self.max_seq_len, job_config.validation.seq_len)
        if tokenizer is None:
            if self.vocab_size <= 0:
                raise ConfigError(
                    f"{flavor} takes its vocab_size from the tokenizer, but none was given; "
                    "point model.hf_assets_path at a tokenizer"
                )
            return
        if self.vocab_size <= 0:
            self.vocab_size = tokenizer.vocab_size
        elif tokenizer.vocab_size > self.vocab_size:
            raise ConfigError(
                f"model.hf_assets_path={job_config.model.hf_assets_path!r}: tokenizer has "
                f"{tokenizer.vocab_size} tokens but {flavor} embeds only {self.vocab_size}; "
                "use the flavor's tokenizer or a flavor with a larger vocabulary"
            )

    def tp_head_counts(self) -> dict[str, int]:
        return {"n_heads": self.n_heads, "n_kv_heads": self.kv_heads}

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        return dense_nparams_and_flops(model, self.n_layers, self.n_heads, self.head_dim, seq_len)
