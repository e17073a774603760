"""Process-group setup and teardown, determinism, DTensor-aware gradient clipping and logging reductions."""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import random
import sys
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)


def init_distributed(comm_config: Any, dump_folder: str = "") -> torch.device:
    """Pick the device and, under a launcher (WORLD_SIZE set), create the default process group.

    CUDA -> `cuda:LOCAL_RANK` with NCCL; otherwise CPU with gloo. A plain `python -m ...` run (no
    WORLD_SIZE) creates no process group. On CPU with several ranks each rank gets one intra-op thread
    unless OMP_NUM_THREADS is set. `comm_config.init_timeout_seconds` bounds the rendezvous. The flight
    recorder dumps (NCCL only) go under `dump_folder` (see `configure_flight_recorder`).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        configure_flight_recorder(comm_config, dump_folder, device.type)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=comm_config.init_timeout_seconds),
            device_id=device if device.type == "cuda" else None,
        )
    return device


def shutdown(clean: bool) -> None:
    """Destroy the process group, if any. After a clean run a barrier first avoids a rank aborting at
    gloo teardown; after a failure it is skipped, since the other ranks may never reach it."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End an entry point's process with `code`. A rank of a multi-process job leaves after Python's exit
    handlers (logging, wandb) but without C++ static destructors: with gloo and functional collectives,
    torch 2.13 sometimes aborts in them ("terminate called without an active exception") after a run
    that succeeded, and torchrun then reports the job as failed."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def configure_flight_recorder(comm_config: Any, dump_folder: str, device_type: str) -> str | None:
    """Set up NCCL's flight recorder before the process group exists; returns the dump folder or None.

    With `comm.trace_buf_size` > 0 on CUDA, the last collectives of each rank are recorded and dumped to
    `dump_folder/comm.save_traces_folder/rank_N` when a collective times out. Gloo has no flight
    recorder, so on CPU this only says so, once. Variables the user already set win.
    """
    if comm_config.trace_buf_size <= 0:
        return None
    if device_type != "cuda":
        logger.info(
            f"comm.trace_buf_size={comm_config.trace_buf_size}: the flight recorder needs NCCL (CUDA); "
            "no collective traces are recorded on this device"
        )
        return None
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(comm_config.trace_buf_size))
    trace_dir = os.path.join(dump_folder, comm_config.save_traces_folder)
    os.makedirs(trace_dir, exist_ok=True)
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", os.path.join(trace_dir, "rank_"))
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    return trace_dir


def set_pg_timeouts(timeout_seconds: float, parallel_dims: ParallelDims) -> None:
    """Switch every process group of the run to the (usually shorter) training timeout.

    Call after the first step: the barrier makes sure no rank is still compiling or loading under the
    longer init timeout when the short one takes effect.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    timeout = timedelta(seconds=timeout_seconds)
    groups = [dist.group.WORLD]
    mesh = parallel_dims.world_mesh
    if mesh is not None:
        groups += mesh.get_all_groups()
    for group in groups:
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def set_determinism(parallel_dims: ParallelDims, device: torch.device, debug_config: Any) -> int:
    """Seed python, numpy and torch (all devices) identically on every rank; returns the seed used.

    With `debug_config.seed` unset, rank 0 draws a seed and broadcasts it so that all ranks agree.
    Pipeline stages get distinct seeds (seed + pp rank). `debug_config.deterministic` turns on
    deterministic algorithms (`deterministic_warn_only` only warns on nondeterministic ops).
    """
    if debug_config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=getattr(debug_config, "deterministic_warn_only", False))
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    seed = debug_config.seed
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
        if dist.is_initialized():
            t = torch.tensor(seed, dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
            dist.broadcast(t, src=0)
            seed = int(t.item())
    pp_mesh = parallel_dims.get_mesh("pp")
    if pp_mesh is not None:
        seed += pp_mesh.get_local_rank()
    seed %= 2**63
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)
    os.environ["PYTHONHASHSEED"] = str(seed % 2**32)
    return seed


def loss_parallel_context(parallel_dims: ParallelDims) -> contextlib.AbstractContextManager:
    """Context for the loss computation AND its backward: vocab-sharded cross entropy when enabled."""
    return loss_parallel() if parallel_dims.loss_parallel_enabled else contextlib.nullcontext()


def _mesh_key(t: torch.Tensor) -> Any:
    return (t.device_mesh, t.placements) if isinstance(t, DTensor) else None


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    foreach: bool | None = None,
    pp_mesh: DeviceMesh | None = None,
    uncounted: Iterable[torch.Tensor] = (),
) -> torch.Tensor:
    """Clip gradients by their true global norm and return that norm (a plain 0-dim tensor).

    Gradients may be plain tensors or DTensors sharded over FSDP/TP meshes (possibly different meshes
    for different parameters): norms are computed per group of identical layout and reduced to full
    values before combining. Under PP, pass `pp_mesh` to combine the stages' norms. `uncounted`: some of
    `parameters` that are clipped but left out of the norm (copies of counted ones, e.g. a tied weight
    that a later pipeline stage holds again).
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    norm_type = float(norm_type)
    skip = {id(p) for p in uncounted}
    # Group by layout: parameters on different meshes (e.g. FSDP-only vs FSDP x TP) cannot share
    # foreach kernels or one reduction.
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(_mesh_key(p.grad), []).append(p)
    norms = []
    for group in groups.values():
        counted = [p.grad for p in group if id(p) not in skip]
        if not counted:
            continue
        norm = torch.nn.utils.get_total_norm(counted, norm_type, foreach=foreach)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        total = torch.tensor(0.0)
    elif math.isinf(norm_type):
        total = torch.stack(norms).max()
    else:
        total = torch.stack(norms).pow(norm_type).sum()
    if pp_mesh is not None:
        op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
        dist.all_reduce(total, op=op, group=pp_mesh.get_group())
    if not math.isinf(norm_type):
        total = total.pow(1.0 / norm_type)
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total.to(group[0].grad.device), foreach=foreach)
    return total


def _reduce(x: float | torch.Tensor, op: dist.ReduceOp, mesh: DeviceMesh | None) -> float:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.tensor(float(x))
    if isinstance(t, DTensor):
        t = t.full_tensor()
    if mesh is None:
        return float(t.item())
    device = "cuda" if mesh.device_type == "cuda" else "cpu"
    # all_reduce works in place: reduce a copy, never the caller's tensor (`.float()` of an fp32
    # tensor or `.to()` to its own device would return that very tensor).
    t = t.to(device=device, dtype=torch.float32, copy=True).reshape(())
    dist.all_reduce(t, op=op, group=mesh.get_group())
    return float(t.item())


def dist_sum(x: float | torch.Tensor, mesh: DeviceMesh | None = None) -> float:
    """Sum of a scalar over a 1-D mesh (the value itself when mesh is None)."""
    return _reduce(x, dist.ReduceOp.SUM, mesh)


def dist_max(x: float | torch.Tensor, mesh: DeviceMesh | None = None) -> float:
    """Max of a scalar over a 1-D mesh (the value itself when mesh is None)."""
    return _reduce(x, dist.ReduceOp.MAX, mesh)


def dist_mean(x: float | torch.Tensor, mesh: DeviceMesh | None = None) -> float:
    """Mean of a scalar over a 1-D mesh (the value itself when mesh is None)."""
    return _reduce(x, dist.ReduceOp.SUM, mesh) / (1 if mesh is None else mesh.size())
