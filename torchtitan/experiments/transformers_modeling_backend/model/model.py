"""HFTransformerModel: a transformers causal LM (its own modules) with a torchtitan-style interface.

The model class named by the config's `architectures` (e.g. LlamaForCausalLM) is instantiated with SDPA
attention, and its modules are adopted as children under the same names, so parameter FQNs equal the
Hugging Face checkpoint keys (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, ...,
`lm_head.weight`). The forward runs those modules directly: token ids (and optional positions) in,
logits out, no cache and no mask (causal SDPA). Pipeline stages may set `model.embed_tokens`,
`model.norm` or `lm_head` to None and drop layers; the forward then skips them.
"""

from __future__ import annotations

import torch
from torch import nn

from torchtitan.experiments.transformers_modeling_backend.model.args import HFTransformerModelArgs


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


class HFTransformerModel(nn.Module):
    """The decoder of `model_args.hf_config` (built on the current default device; use meta + `init_weights`
    in training). Tied input/output embeddings are one parameter."""

    def __init__(self, model_args: HFTransformerModelArgs) -> None:
        super().__init__()
        import transformers

        if model_args.hf_config is None:
            raise ValueError("HFTransformerModelArgs.update_from_config(job_config) must run before building the model")
        self.model_args = model_args
        self.config = model_args.hf_config
        cls = getattr(transformers, model_args.architecture)
        hf_model = cls._from_config(self.config, attn_implementation="sdpa", dtype=torch.float32)
        self.model = hf_model.model
        self.lm_head = hf_model.lm_head
        # Position ids for forwards called without them (context parallelism sets this rank's here).
        self.default_positions: torch.Tensor | None = None
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make the output head use the embedding's weight parameter when the config ties them.

        `to_empty` gives every module a new parameter (meta -> real), which unties them; so does any
        per-module parameter replacement, hence `init_weights` ties again."""
        if self.config.tie_word_embeddings and self.model.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def blocks(self) -> list[nn.Module]:
        """The decoder layers present on this model (all of them unless a pipeline stage dropped some)."""
        layers = self.model.layers
        return list(layers.values() if isinstance(layers, nn.ModuleDict) else layers)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (batch, seq) ids, or (batch, seq, dim) hidden states on a stage without embeddings;
        positions: (batch or 1, seq) position ids, default `default_positions` or 0..seq-1. Returns logits (batch, seq, vocab),
        or hidden states on a stage without the output head."""
        if positions is None:
            positions = self.default_positions
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        h = self.model.embed_tokens(tokens) if self.model.embed_tokens is not None else tokens
        # The rotary module reads only dtype and device from its first argument.
        cos_sin = self.model.rotary_emb(h, positions)
        for layer in self.blocks:
            h = layer(h, position_embeddings=cos_sin, position_ids=positions)
        h = self.model.norm(h) if self.model.norm is not None else h
        return self.lm_head(h) if self.lm_head is not None else h

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Initialize as transformers does for these families: Linear and Embedding weights ~ N(0,
        config.initializer_range), biases zero, RMSNorm weights (q/k norms included) one; a tied output
        head is tied again first (after `to_empty`). The rotary
        inverse frequencies (a non-persistent buffer, garbage after `to_empty`) are recomputed from the
        config, with the config's rope scaling (e.g. llama3)."""
        self.tie_weights()
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif _is_rms_norm(module):
                nn.init.ones_(module.weight)
        self.init_rope_buffers(buffer_device)

    @torch.no_grad()
    def init_rope_buffers(self, buffer_device: torch.device | None = None) -> None:
        """Recompute `model.rotary_emb`'s inv_freq buffers (on `buffer_device`, else where they live)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rotary = self.model.rotary_emb
        if rotary.rope_type == "default":
            init_fn = rotary.compute_default_rope_parameters
        else:
            init_fn = ROPE_INIT_FUNCTIONS[rotary.rope_type]
        inv_freq, rotary.attention_scaling = init_fn(rotary.config)
        device = buffer_device or rotary.inv_freq.device
        for name in ("inv_freq", "original_inv_freq"):
            if getattr(rotary, name, None) is not None:
                setattr(rotary, name, inv_freq.to(device=device, dtype=torch.float32).clone())
