"""Per-rank peak memory of one training step without allocating it: a FakeTensorMode step over a fake process
group, tallied by torch's MemTracker, next to the analytic breakdown of `memory_model`.

`estimate_memory(job_config, world_size)` returns both and `format_table` prints them; `measure_cpu_peak`
measures a real single-process step on CPU from the allocator's events (torch.profiler's memory profiling),
the reference the estimate is tested against (docs/memory_estimation.md).
"""

import contextlib
import copy
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from torchtitan.distributed.fake_backend import init_fake_process_group
from torchtitan.distributed.parallel_dims import ParallelDims, validate_model
from torchtitan.protocols.model_converter import build_model_converters
from torchtitan.protocols.train_spec import build_meta_model, get_train_spec
from torchtitan.tools.logging import get_logger
from torchtitan.tools.memory_model import GIB, Layout, Shape, breakdown
from torchtitan.tools.utils import TORCH_DTYPES, resolve_mixed_precision_param

logger = get_logger(__name__)

# MemTracker's categories -> our names.
_CATEGORIES = {"PARAM": "params", "BUFFER": "buffers", "GRAD": "grads", "OPT": "optimizer", "ACT": "activations",
               "TEMP": "temporaries", "OTH": "other"}


def compute_dtype(job_config: Any, device_type: str | None = None) -> torch.dtype:
    """`training.mixed_precision_param` with "auto" resolved for `device_type` (default: this machine's)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return TORCH_DTYPES[resolve_mixed_precision_param(job_config.training.mixed_precision_param, device_type)]


def meta_model(job_config: Any) -> tuple[Any, torch.nn.Module]:
    """The job's model args and model on the meta device. The tokenizer is read only when the flavor takes its
    vocabulary size from it, so the large flavors are estimated without their tokenizer files."""
    spec = get_train_spec(job_config.model.name)
    flavor_args = spec.model_args.get(job_config.model.flavor)  # an unknown flavor is reported by build_meta_model
    needs_tokenizer = getattr(flavor_args, "vocab_size", 1) <= 0
    return build_meta_model(spec, job_config, spec.build_tokenizer_fn(job_config) if needs_tokenizer else None)


def _meta_model(job_config: Any, parallel_dims: ParallelDims) -> tuple[Any, torch.nn.Module]:
    """The job's model args and its converted, parallelized model on the meta device, as the trainer builds it."""
    spec = get_train_spec(job_config.model.name)
    args, model = meta_model(job_config)
    validate_model(parallel_dims, args, job_config)
    build_model_converters(job_config, parallel_dims).convert(model)
    return args, spec.parallelize_fn(model, parallel_dims, job_config)


def _step_fn(
    job_config: Any, parallel_dims: ParallelDims, args: Any, model: torch.nn.Module, device: torch.device, init: bool
) -> tuple:
    """Materialize the meta `model` (initialized when `init`), its optimizer and one batch like the trainer;
    returns (step function, model, optimizers)."""
    spec = get_train_spec(job_config.model.name)
    model.to_empty(device=device)
    if init:
        with torch.no_grad():
            model.init_weights(buffer_device=None)
    optimizers = spec.build_optimizers_fn([model], job_config.optimizer, parallel_dims)
    loss_fn = spec.build_loss_fn(job_config)
    tc = job_config.training
    batch = torch.randint(0, args.vocab_size, (tc.local_batch_size, tc.seq_len + 1), device=device)
    dtype = compute_dtype(job_config, device.type)
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32 and not parallel_dims.fsdp_enabled
        else contextlib.nullcontext()
    )

    def step() -> None:
        optimizers.zero_grad()
        with autocast:
            loss = loss_fn(model(batch[:, :-1]), batch[:, 1:]) / batch[:, 1:].numel()
        loss.backward()
        optimizers.step()

    return step, model, optimizers


def _tracked_second_step(step: Callable, model: torch.nn.Module, optimizers: Any) -> dict[str, int]:
    """Run a first step (which creates the optimizer states), then tally the second one: the steady state."""
    step()
    tracker = MemTracker()
    tracker.track_external(model, *optimizers)
    with tracker:
        step()
    peaks = tracker.get_tracker_snapshot("peak").values()
    snap = max(peaks, key=lambda d: d["Total"])
    tally = {name: snap.get(_MemRefType[key], 0) for key, name in _CATEGORIES.items()}
    tally["peak"] = snap["Total"]
    return tally


def fake_step_tally(job_config: Any, world_size: int) -> dict[str, int]:
    """Rank 0's peak bytes per MemTracker category over one full train step (forward, backward, optimizer),
    run under FakeTensorMode with a fake process group of `world_size` ranks: no memory is allocated."""
    job_config = copy.deepcopy(job_config)
    pd = ParallelDims.from_job_config(job_config, world_size)
    owns_group = not dist.is_initialized()
    if owns_group and world_size > 1:
        init_fake_process_group(world_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pd.build_mesh()
        args, model = _meta_model(job_config, pd)
        with FakeTensorMode(allow_non_fake_inputs=True):
            # no init_weights: it draws values (truncated normal), which fake tensors do not have
            step, model, optimizers = _step_fn(job_config, pd, args, model, device, init=False)
            return _tracked_second_step(step, model, optimizers)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def measure_cpu_peak(job_config: Any) -> int:
    """The measured peak bytes of a real second train step in this process on CPU (one rank, no process group):
    the bytes live before it (parameters, buffers, optimizer states; gradients are dropped first) plus the
    highest running sum of the step's allocations minus frees, from torch.profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    pd = ParallelDims.from_job_config(job_config, 1)
    args, model = _meta_model(job_config, pd)
    step, model, optimizers = _step_fn(job_config, pd, args, model, torch.device("cpu"), init=True)
    step()
    optimizers.zero_grad()
    live = sum(t.numel() * t.element_size() for t in _live_tensors(model, optimizers))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    running = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action in (Action.CREATE, Action.DESTROY):
            running += size if action == Action.CREATE else -size
            peak = max(peak, running)
    return live + peak


def _live_tensors(model: torch.nn.Module, optimizers: Any) -> list[torch.Tensor]:
    tensors = {id(p): p for p in model.parameters()}
    tensors.update({id(b): b for b in model.buffers()})
    tensors.update({id(p.grad): p.grad for p in model.parameters() if p.grad is not None})
    for opt in optimizers:
        for state in opt.state.values():
            tensors.update({id(v): v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0})
    return list(tensors.values())


def job_shape(job_config: Any, device_type: str | None = None) -> tuple[Any, Shape]:
    """The flavor's args and the memory model's Shape of the job (compute dtype resolved for `device_type`)."""
    model_args, _ = meta_model(job_config)
    tc = job_config.training
    param_bytes = compute_dtype(job_config, device_type).itemsize
    return model_args, Shape.from_args(model_args, tc.seq_len, tc.local_batch_size, param_bytes)


def analytic_breakdown(job_config: Any, layout: Layout) -> dict[str, float]:
    """The analytic per-rank bytes of the job under `layout`."""
    _, shape = job_shape(job_config)
    return breakdown(shape, layout, job_config.parallelism.pipeline_parallel_microbatch_size)


def job_layout(job_config: Any, world_size: int) -> Layout:
    """The job's own layout (dp_shard -1 resolved for `world_size`) and AC mode."""
    pd = ParallelDims.from_job_config(job_config, world_size)
    ac = job_config.activation_checkpoint
    mode = ac.mode if ac.mode != "selective" else ("op" if ac.selective_ac_option == "op" else "selective")
    return Layout(pd.dp_replicate, pd.dp_shard, pd.tp, pd.pp, pd.cp, mode)


def estimate_memory(job_config: Any, world_size: int) -> dict[str, dict[str, float]]:
    """{"fake_step": MemTracker tally of a FakeTensorMode step, "analytic": the memory model}, bytes per rank."""
    analytic = analytic_breakdown(job_config, job_layout(job_config, world_size))
    return {"fake_step": fake_step_tally(job_config, world_size), "analytic": analytic}


def format_table(estimate: dict[str, dict[str, float]], device_memory_gib: float | None = None) -> str:
    """A GiB table with one row per category and one column per estimate."""
    columns = list(estimate)
    names = list(dict.fromkeys(n for col in columns for n in estimate[col] if n != "peak")) + ["peak"]
    lines = [f"{'per rank (GiB)':<16}" + "".join(f"{c:>14}" for c in columns)]
    for name in names:
        cells = "".join(f"{estimate[c][name] / GIB:>14.3f}" if name in estimate[c] else f"{'-':>14}" for c in columns)
        lines.append(f"{name:<16}{cells}")
    if device_memory_gib:
        fits = ", ".join(f"{c}: {'fits' if estimate[c]['peak'] / GIB <= device_memory_gib else 'does NOT fit'}"
                         for c in columns)
        lines.append(f"device memory {device_memory_gib:g} GiB -> {fits}")
    return "\n".join(lines)


def log_memory_estimate(job_config: Any, world_size: int) -> None:
    """`[memory_estimation] enable`: log the estimate table of the job before training (rank 0 only; the other
    ranks wait at the process-group rendezvous). With `disable_fake_mode` only the analytic model runs."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if job_config.memory_estimation.disable_fake_mode:
        estimate = {"analytic": analytic_breakdown(job_config, job_layout(job_config, world_size))}
        logger.info("memory_estimation.disable_fake_mode: the analytic model only, no FakeTensorMode step")
    else:
        estimate = estimate_memory(job_config, world_size)
    logger.info(f"memory estimate per rank at world size {world_size}:\n{format_table(estimate)}")
