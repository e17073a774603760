"""The attention kernel every model calls: causal `F.scaled_dot_product_attention`.

Masking: causal only. Packed documents attend across their boundaries (as in torchtitan's SDPA
path); per-document masks would need FlexAttention, whose backward does not run on CPU.
Grouped-query attention: callers pass K/V with fewer heads than Q; SDPA's `enable_gqa` lets query
head j use key/value head j // (q heads / kv heads) without materializing repeated K/V.
Being a module, it is the hook point for context parallelism and op-level AC.
On a CPU, bf16 attention runs in fp32: torch's CPU flash-attention kernels are 2-6x slower in bf16 than
in fp32 at training shapes (their backward most), while the matmuls around them gain from bf16.
"""

import torch
import torch.nn.functional as F
from torch import nn


class ScaledDotProductAttention(nn.Module):
    """Causal softmax attention on [batch, heads, seq, head_dim] tensors."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            with torch.autocast("cpu", enabled=False):
                return _causal_sdpa(q.float(), k.float(), v.float()).to(torch.bfloat16)
        return _causal_sdpa(q, k, v)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
