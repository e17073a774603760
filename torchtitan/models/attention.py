"""The attention kernel every model calls: causal `F.scaled_dot_product_attention`.

Masking: causal only. Packed documents attend across their boundaries (as in torchtitan's SDPA
path); per-document masks would need FlexAttention, whose backward does not run on CPU.
Grouped-query attention is handled here by repeating K/V heads, so callers pass K/V with fewer
heads than Q. Being a module, it is the hook point for context parallelism and op-level AC.
"""

import torch
import torch.nn.functional as F
from torch import nn


class ScaledDotProductAttention(nn.Module):
    """Causal softmax attention on [batch, heads, seq, head_dim] tensors."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_rep = q.shape[1] // k.shape[1]
        if n_rep > 1:
            # query head j uses key/value head j // n_rep (the layout of Llama's and HF's GQA)
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
