"""torch.profiler traces and CUDA memory snapshots, each behind a config switch; the activations a
forward saves for backward (benchmarks and tests)."""

import contextlib
import os
import pickle
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from torchtitan.config import ConfigError
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

# Allocation events kept by the CUDA allocator's history ring buffer.
_MEMORY_HISTORY_MAX_ENTRIES = 100_000


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def maybe_enable_profiling(
    profiling_config: Any, dump_folder: str, global_step: int = 0
) -> Iterator[torch.profiler.profile | None]:
    """Yield a started torch.profiler (call `.step()` once per training step) or None when profiling is off.

    Every `profile_freq` steps a trace of the last `profiler_active` steps (after `profiler_warmup` warm-up
    steps) goes to `dump_folder/save_traces_folder/iteration_N/rank{r}_trace.json`. `global_step` is the
    step the run resumes from, so iteration numbers stay global.
    """
    if not profiling_config.enable_profiling:
        yield None
        return
    freq = profiling_config.profile_freq
    warmup, active = profiling_config.profiler_warmup, profiling_config.profiler_active
    wait = freq - warmup - active
    if wait < 0 or active < 1:
        raise ConfigError(
            f"profiling.profile_freq={freq} must be >= profiler_warmup ({warmup}) + profiler_active ({active}) "
            "and profiler_active >= 1: raise profile_freq or lower the other two"
        )
    trace_dir = os.path.join(dump_folder, profiling_config.save_traces_folder)
    rank = _rank()

    def write_trace(prof: torch.profiler.profile) -> None:
        out_dir = os.path.join(trace_dir, f"iteration_{prof.step_num}")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"rank{rank}_trace.json")
        prof.export_chrome_trace(path)
        logger.info(f"Profiler trace written to {path}")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    logger.info(f"Profiling active; traces go to {trace_dir}")
    with torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active),
        on_trace_ready=write_trace,
        record_shapes=True,
    ) as profiler:
        profiler.step_num = global_step
        yield profiler


class MemorySnapshotter:
    """Records CUDA allocator history; `step()` dumps a snapshot every `freq` steps."""

    def __init__(self, snapshot_dir: str, global_step: int, freq: int) -> None:
        self.snapshot_dir = snapshot_dir
        self.step_num = global_step
        self.freq = freq
        torch.cuda.memory._record_memory_history(max_entries=_MEMORY_HISTORY_MAX_ENTRIES)

    def step(self, exit_ctx: bool = False) -> None:
        """Call once per training step; `exit_ctx=True` dumps right away (e.g. on an out-of-memory error)."""
        if exit_ctx:
            name = f"iteration_{self.step_num}_exit"
        else:
            self.step_num += 1
            if self.step_num % self.freq != 0:
                return
            name = f"iteration_{self.step_num}"
        out_dir = os.path.join(self.snapshot_dir, name)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"rank{_rank()}_memory_snapshot.pickle")
        with open(path, "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f)
        logger.info(f"Memory snapshot written to {path}")

    def close(self) -> None:
        torch.cuda.memory._record_memory_history(enabled=None)


@contextlib.contextmanager
def maybe_enable_memory_snapshot(
    profiling_config: Any, dump_folder: str, global_step: int = 0
) -> Iterator[MemorySnapshotter | None]:
    """Yield a MemorySnapshotter writing to `dump_folder/save_memory_snapshot_folder/` every `profile_freq` steps,
    or None when snapshots are off or CUDA is unavailable (then with a one-line warning)."""
    if not profiling_config.enable_memory_snapshot:
        yield None
        return
    if not torch.cuda.is_available():
        logger.warning("profiling.enable_memory_snapshot needs a CUDA device; no memory snapshots on CPU")
        yield None
        return
    snapshot_dir = os.path.join(dump_folder, profiling_config.save_memory_snapshot_folder)
    snapshotter = MemorySnapshotter(snapshot_dir, global_step, profiling_config.profile_freq)
    try:
        yield snapshotter
    finally:
        snapshotter.close()


@contextlib.contextmanager
def saved_activations(model: torch.nn.Module) -> Iterator[dict[int, int]]:
    """Yield {storage pointer: bytes} of the distinct storages, parameters excluded, that autograd saves
    for backward inside the block."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if (ptr := t.untyped_storage().data_ptr()) not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved
