"""Context parallelism: each rank of the CP group holds a share of every sequence.

Sequence sharding: the sequence is cut into equal chunks; `headtail` (2 x cp chunks, rank i keeps
chunks i and 2cp-1-i) balances causal attention work across ranks, `none` gives rank i chunk i of cp.
Inputs, labels and the RoPE table are sharded the same way, so RoPE uses each token's true position.

Attention, replacing every `ScaledDotProductAttention` of the model, in one of two implementations:
- `allgather_kv` (ours, any device and backend, `context_parallel_attention.py`): all-gather K/V over the
  CP group, exact causal attention for each local query chunk against the keys up to its end; the
  backward reduce-scatters dK/dV.
- `torch_ring` (CUDA): torch's ring attention, rotating K/V by all-gather or all-to-all
  (`context_parallel_rotate_method`); torch has no sharding rule for the CPU attention kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchtitan.config.errors import ConfigError
from torchtitan.distributed.context_parallel_attention import AllGatherKVAttention, repeat_heads
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

LOAD_BALANCERS = ("headtail", "none")
IMPLEMENTATIONS = ("auto", "allgather_kv", "torch_ring")
_KEY = "parallelism.context_parallel"


def normalize_load_balancer(value: str | None) -> str:
    """`headtail` or `none` (torchtitan's None means no balancing; config validation checks the values)."""
    return "none" if value is None else str(value).lower()


def chunk_ids(load_balancer: str, cp: int, rank: int) -> list[int]:
    """The sequence chunks CP rank `rank` holds, in local order (2 x cp chunks for headtail, else cp)."""
    return [rank, 2 * cp - 1 - rank] if load_balancer == "headtail" else [rank]


def token_positions(seq_len: int, cp: int, rank: int, load_balancer: str) -> torch.Tensor:
    """The true positions [seq_len / cp] of the tokens CP rank `rank` holds, in local order."""
    ids = chunk_ids(load_balancer, cp, rank)
    chunk = seq_len // (cp * len(ids))
    return torch.cat([torch.arange(i * chunk, (i + 1) * chunk) for i in ids])


def resolve_implementation(choice: str, rotate_method: str, device_type: str) -> str:
    """The attention implementation `choice` means on `device_type` (auto: torch_ring on CUDA, else
    allgather_kv); ConfigError for an option this device or implementation does not have."""
    if choice not in IMPLEMENTATIONS:
        raise ConfigError(f"--{_KEY}_attention={choice} is invalid; use one of {', '.join(IMPLEMENTATIONS)}")
    impl = choice if choice != "auto" else ("torch_ring" if device_type == "cuda" else "allgather_kv")
    if impl == "torch_ring" and device_type != "cuda":
        raise ConfigError(
            f"--{_KEY}_attention=torch_ring needs CUDA (torch has no CP rule for the {device_type} attention "
            "kernel); use allgather_kv or auto"
        )
    if impl == "allgather_kv" and rotate_method != "allgather":
        raise ConfigError(
            f"--{_KEY}_rotate_method={rotate_method} applies only to torch_ring (CUDA); "
            f"{impl} all-gathers K/V: use allgather"
        )
    return impl


class _CausalSDPA(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


class _RepeatKV(nn.Module):
    """Repeats K/V heads to the query heads on the local tensors, then calls `inner` (torch's ring
    attention takes no GQA)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        return self.inner(q, repeat_heads(k, groups), repeat_heads(v, groups), scale=scale)


def _torch_ring_attention(mesh: DeviceMesh, load_balancer: str, rotate_method: str) -> nn.Module:
    """An attention module whose q/k/v become sequence-sharded DTensors, dispatched to torch's ring
    attention (load balancing and rotation are process-wide options in torch)."""
    from torch.distributed.tensor.experimental import _attention as torch_cp
    from torch.distributed.tensor.parallel import parallelize_module

    torch_cp._cp_options.enable_load_balance = load_balancer == "headtail"
    torch_cp.set_rotate_method(rotate_method)
    torch_cp._enable_context_parallel_dispatcher()
    style = torch_cp._ContextParallel(seq_dim=2, attention_type=torch_cp._ContextParallel.AttentionType.SDPA)
    return _RepeatKV(parallelize_module(_CausalSDPA(), mesh, style))


class ContextParallel:
    """The CP setup of a run: shards microbatches and swaps in this rank's RoPE table."""

    def __init__(self, mesh: DeviceMesh, load_balancer: str, implementation: str, rotate_method: str = "allgather"):
        self.mesh = mesh
        self.cp = mesh.size()
        self.rank = mesh.get_local_rank()
        self.load_balancer = load_balancer
        self.implementation = implementation
        self.rotate_method = rotate_method

    def positions(self, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return token_positions(seq_len, self.cp, self.rank, self.load_balancer).to(device)

    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's tokens of each [batch, seq, ...] tensor (inputs, labels), in local chunk order."""
        index = self.positions(tensors[0].shape[1], tensors[0].device)
        return tuple(t.index_select(1, index) for t in tensors)

    def attention(self) -> nn.Module:
        """A new attention module for one block."""
        if self.implementation == "torch_ring":
            return _torch_ring_attention(self.mesh, self.load_balancer, self.rotate_method)
        return AllGatherKVAttention(self.mesh, [chunk_ids(self.load_balancer, self.cp, r) for r in range(self.cp)])

    @contextlib.contextmanager
    def rope_context(self, model_parts: list[nn.Module], seq_len: int) -> Iterator[None]:
        """During forward and backward, every token is rotated by its true position: a part with a
        `freqs_cis` RoPE table (our models) holds only this rank's rows of it, so `freqs_cis[:local_len]`
        applies; a part with a `default_positions` attribute (the transformers backend) gets this rank's
        position ids [1, local_len] there, for forwards called without positions."""
        tables = [(m, m.freqs_cis) for m in model_parts if isinstance(getattr(m, "freqs_cis", None), torch.Tensor)]
        takes_positions = [m for m in model_parts if hasattr(m, "default_positions")]
        positions = self.positions(seq_len)
        try:
            for m, table in tables:
                m.freqs_cis = table.index_select(0, positions.to(table.device))
            for m in takes_positions:
                m.default_positions = positions.to(next(m.parameters()).device).unsqueeze(0)
            yield
        finally:
            for m, table in tables:
                m.freqs_cis = table
            for m in takes_positions:
                m.default_positions = None

    def summary(self) -> str:
        rotate = f" ({self.rotate_method} rotate)" if self.implementation == "torch_ring" else ""
        return (
            f"context parallel degree {self.cp}, load balancer {self.load_balancer}, "
            f"attention {self.implementation}{rotate}"
        )

    def describe(self, seq_len: int) -> str:
        """The layout and every CP rank's token ranges, one line each."""
        lines = [self.summary()]
        for rank in range(self.cp):
            ids = chunk_ids(self.load_balancer, self.cp, rank)
            size = seq_len // (self.cp * len(ids))
            ranges = " + ".join(f"[{i * size}, {(i + 1) * size})" for i in ids)
            lines.append(f"  cp rank {rank}: tokens {ranges} of {seq_len}")
        return "\n".join(lines)


def rope_context(cp: ContextParallel | None, model_parts: list[nn.Module], seq_len: int) -> Any:
    """`cp.rope_context(...)`, or a no-op context without CP."""
    return contextlib.nullcontext() if cp is None else cp.rope_context(model_parts, seq_len)


def build_context_parallel(parallel_dims: Any, job_config: Any, device_type: str) -> ContextParallel | None:
    """The run's ContextParallel (None without CP), its options checked for this device."""
    if not parallel_dims.cp_enabled:
        return None
    p = job_config.parallelism
    impl = resolve_implementation(p.context_parallel_attention, p.context_parallel_rotate_method, device_type)
    balancer = normalize_load_balancer(p.context_parallel_load_balancer)
    return ContextParallel(parallel_dims.get_mesh("cp"), balancer, impl, p.context_parallel_rotate_method)


def apply_cp(model: nn.Module, cp: ContextParallel, attention_cls: type[nn.Module]) -> None:
    """Replace every `attention_cls` module (the model's causal SDPA) in `model` by `cp`'s CP attention."""
    targets = [name for name, m in model.named_modules() if isinstance(m, attention_cls)]
    if not targets:
        raise ConfigError(
            f"--{_KEY}_degree={cp.cp} needs a model whose attention is a {attention_cls.__name__} module; set it to 1"
        )
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, cp.attention())
    logger.info(f"Applied {cp.summary()}")
