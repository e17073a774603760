"""Our context-parallel attention: all-gather K/V over the CP group, exact causal attention for the local
(load-balanced) query chunks.

On CPU it is one autograd function over the flash-attention kernel, which also returns each row's
log-sum-exp: query chunk n attends, without any mask, to the keys of the chunks before it and causally to
its own chunk; the two partial results merge by log-sum-exp. Only this rank's q/k/v, the output and the
log-sum-exp are saved for backward; the backward gathers K/V again and reduce-scatters dK/dV. So no rank
keeps a whole sequence's K/V per layer, and per-rank activation memory falls with the CP degree.

On other devices (where that kernel's signature differs) it is SDPA with one additive causal mask per
chunk shape, the K/V gathered by an autograd-aware collective.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class ChunkLayout:
    """Where the sequence chunks live: `local_chunks` (global chunk ids this rank holds, in local order) and
    the permutations between the rank-major gathered order and the natural token order."""

    def __init__(self, mesh: DeviceMesh, chunks_of_rank: list[list[int]]):
        self.mesh = mesh
        self.cp = mesh.size()
        self.local_chunks = chunks_of_rank[mesh.get_local_rank()]
        self.per_rank = len(self.local_chunks)
        slot_of = {c: r * self.per_rank + m for r, chunks in enumerate(chunks_of_rank) for m, c in enumerate(chunks)}
        # natural_order[n]: the gathered slot (rank r, local chunk m -> r * per_rank + m) holding chunk n
        self.natural_order = [slot_of[c] for c in range(self.cp * self.per_rank)]
        self.gathered_order = sorted(range(len(self.natural_order)), key=self.natural_order.__getitem__)

    def to_natural(self, gathered: torch.Tensor, batch: int) -> torch.Tensor:
        """[cp * B, H, L, D] rank-major -> [B, H, seq_len, D] in natural token order."""
        chunks = gathered.unflatten(0, (self.cp, batch)).unflatten(3, (self.per_rank, -1))  # [cp, B, H, m, c, D]
        chunks = chunks.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)  # [B, H, cp * m, c, D], rank-major
        return chunks[:, :, self.natural_order].flatten(2, 3)

    def to_gathered(self, natural: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_natural`: [B, H, seq_len, D] -> [cp * B, H, L, D] rank-major."""
        chunks = natural.unflatten(2, (self.cp * self.per_rank, -1))[:, :, self.gathered_order]
        chunks = chunks.unflatten(2, (self.cp, self.per_rank)).permute(2, 0, 1, 3, 4, 5)  # [cp, B, H, m, c, D]
        return chunks.flatten(3, 4).flatten(0, 1).contiguous()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's [B, H, L, D] -> the group's [B, H, seq_len, D] (no autograd)."""
        return self.to_natural(funcol.all_gather_single(x.contiguous(), 0, self.mesh), x.shape[0])


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, KVH, ...] -> [B, KVH * groups, ...], each K/V head repeated for its group of query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sum_head_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.unflatten(1, (-1, groups)).sum(2)


class _AllGatherKVFlash(torch.autograd.Function):
    """q [B, H, L, D], k/v [B, KVH, L, D] (local chunk order) -> attention output [B, H, L, D]."""

    @staticmethod
    def forward(
        ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ChunkLayout, scale: float | None
    ) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k_all, v_all = (repeat_heads(layout.gather(t), groups) for t in (k, v))
        size = q.shape[2] // layout.per_rank
        outs, lses = [], []
        for m, chunk in enumerate(layout.local_chunks):
            start = chunk * size
            q_m = q[:, :, m * size : (m + 1) * size]
            own = slice(start, start + size)
            out, lse = _flash(q_m, k_all[:, :, own], v_all[:, :, own], 0.0, True, scale=scale)
            if start:
                out_p, lse_p = _flash(q_m, k_all[:, :, :start], v_all[:, :, :start], 0.0, False, scale=scale)
                merged = torch.logaddexp(lse, lse_p)
                out = (out.float() * (lse - merged).exp().unsqueeze(-1)
                       + out_p.float() * (lse_p - merged).exp().unsqueeze(-1)).to(q.dtype)
                lse = merged
            outs.append(out)
            lses.append(lse)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        ctx.layout, ctx.groups, ctx.scale = layout, groups, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        q, k, v, out, lse = ctx.saved_tensors
        layout, groups, scale = ctx.layout, ctx.groups, ctx.scale
        k_all, v_all = (repeat_heads(layout.gather(t), groups) for t in (k, v))
        dk_all, dv_all = torch.zeros_like(k_all), torch.zeros_like(v_all)
        size = q.shape[2] // layout.per_rank
        dqs = []
        for m, chunk in enumerate(layout.local_chunks):
            start, rows = chunk * size, slice(m * size, (m + 1) * size)
            args = (grad_out[:, :, rows].contiguous(), q[:, :, rows])
            saved = (out[:, :, rows], lse[:, :, rows].contiguous(), 0.0)
            own = slice(start, start + size)
            dq, dk, dv = _flash_backward(*args, k_all[:, :, own], v_all[:, :, own], *saved, True, scale=scale)
            dk_all[:, :, own] += dk
            dv_all[:, :, own] += dv
            if start:
                dq_p, dk, dv = _flash_backward(
                    *args, k_all[:, :, :start], v_all[:, :, :start], *saved, False, scale=scale
                )
                dq = dq + dq_p
                dk_all[:, :, :start] += dk
                dv_all[:, :, :start] += dv
            dqs.append(dq)
        dk, dv = (
            funcol.reduce_scatter_single(layout.to_gathered(_sum_head_groups(g, groups)), "sum", 0, layout.mesh)
            for g in (dk_all, dv_all)
        )
        return torch.cat(dqs, dim=2), dk, dv, None, None


@functools.lru_cache(maxsize=8)
def _causal_mask(size: int, end: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask [size, end] for the last `size` of `end` positions attending causally (query a sees
    keys 0 .. end - size + a). One cached tensor per shape: SDPA saves its mask for backward, so every
    layer then holds the same one (a boolean mask would be converted to a new float copy per layer)."""
    allowed = torch.ones(size, end, dtype=torch.bool, device=device).tril(diagonal=end - size)
    return torch.zeros(size, end, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def masked_allgather_kv_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ChunkLayout, scale: float | None = None
) -> torch.Tensor:
    """The same attention as `_AllGatherKVFlash`, from public ops on any device: K/V gathered with an
    autograd-aware collective (saved per layer), SDPA with a causal mask per local chunk."""
    batch = k.shape[0]
    k_all, v_all = (layout.to_natural(funcol.all_gather_single_autograd(t.contiguous(), 0, layout.mesh), batch)
                    for t in (k, v))
    size = q.shape[2] // layout.per_rank
    outputs = []
    for m, chunk in enumerate(layout.local_chunks):
        end = (chunk + 1) * size
        outputs.append(
            F.scaled_dot_product_attention(
                q[:, :, m * size : (m + 1) * size], k_all[:, :, :end], v_all[:, :, :end],
                attn_mask=_causal_mask(size, end, q.dtype, q.device), enable_gqa=q.shape[1] != k.shape[1], scale=scale,
            )
        )
    return torch.cat(outputs, dim=2)


class AllGatherKVAttention(nn.Module):
    """Causal attention for load-balanced local query chunks against the K/V of the whole CP group.

    Takes q [batch, heads, L, head_dim] and k/v [batch, kv_heads, L, head_dim] (L = seq_len / cp) in the
    local chunk order given by `chunks_of_rank[rank]`. Query chunk n attends to every key chunk before it
    and causally within itself. `scale` multiplies the scores (default 1 / sqrt(head_dim)).
    """

    def __init__(self, mesh: DeviceMesh, chunks_of_rank: list[list[int]]):
        super().__init__()
        self.layout = ChunkLayout(mesh, chunks_of_rank)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        if q.device.type == "cpu":
            return _AllGatherKVFlash.apply(q, k, v, self.layout, scale)
        return masked_allgather_kv_attention(q, k, v, self.layout, scale)
