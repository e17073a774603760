"""Pipeline parallelism, model-agnostic: split a model into stages by module FQNs, place the stages on the
PP ranks, and build torch.distributed.pipelining schedules (named or from a CSV action table).

A model family describes itself by module paths only: the modules of the first stage before the blocks
(`input_modules`), the block container (`layers_attr`: a dotted path to a ModuleDict or ModuleList) and the
modules after them (`output_modules`). Each stage is a copy of the whole (meta) model with the other modules
removed (None, or deleted from the container; parameterless ones stay), so FQNs stay the full model's.
A parameter tied across stages (e.g. embedding and output head) gets a copy per stage: see TiedParameters.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (PipelineScheduleSingle, ScheduleDualPipeV, ScheduleZBVZeroBubble,
                                                   _PipelineSchedule, _PipelineScheduleRuntime, get_schedule_class)

from torchtitan.config.errors import ConfigError
from torchtitan.distributed.module_paths import block_container, set_module, stage_modules
from torchtitan.distributed.tied_parameters import TiedParameters
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
# Only meaningful with a CSV: they say how many stages each rank holds (1 or 2), the CSV says the order.
CSV_SCHEDULES = ("PipelineScheduleSingle", "PipelineScheduleMulti")
V_SCHEDULES = (ScheduleZBVZeroBubble, ScheduleDualPipeV)
_KEY = "--parallelism.pipeline_parallel_schedule"


def schedule_class(name: str, csv_path: str | None = None) -> type[_PipelineSchedule]:
    """The torch schedule class named `name` (case-insensitive); one-line ConfigError listing the names."""
    valid = SCHEDULES + (CSV_SCHEDULES if csv_path else ())
    match = [v for v in valid if v.lower() == name.lower()]
    if not match:
        extra = f" (with a CSV also {', '.join(CSV_SCHEDULES)})" if not csv_path else ""
        raise ConfigError(f"{_KEY}={name!r} is not a schedule; use one of {', '.join(valid)}{extra}")
    return get_schedule_class(match[0])


def is_single_stage(cls: type[_PipelineSchedule]) -> bool:
    return issubclass(cls, PipelineScheduleSingle)


def num_stages(cls: type[_PipelineSchedule], pp: int, n_layers: int, pp_config: Any) -> int:
    """Total stage count: `module_fqns_per_model_part` entries, else from `pipeline_parallel_layers_per_stage`
    (ceil((layers + first_less + last_less) / layers_per_stage)), else 1 or 2 per rank by schedule kind."""
    if pp_config.module_fqns_per_model_part:
        n, key = len(pp_config.module_fqns_per_model_part), "module_fqns_per_model_part"
    elif pp_config.pipeline_parallel_layers_per_stage:
        units = n_layers + pp_config.pipeline_parallel_first_stage_less_layers
        units += pp_config.pipeline_parallel_last_stage_less_layers
        n = math.ceil(units / pp_config.pipeline_parallel_layers_per_stage)
        key = f"pipeline_parallel_layers_per_stage={pp_config.pipeline_parallel_layers_per_stage}"
    else:
        return pp * (1 if is_single_stage(cls) else 2)
    if n % pp:
        raise ConfigError(
            f"--parallelism.{key} gives {n} pipeline stages, which do not divide evenly over "
            f"pipeline_parallel_degree={pp}; choose a value giving a multiple of {pp} stages"
        )
    per_rank = n // pp
    if is_single_stage(cls) and per_rank != 1:
        raise ConfigError(
            f"--parallelism.{key} gives {per_rank} stages per rank but {_KEY}={pp_config.pipeline_parallel_schedule} "
            "runs one stage per rank; use a multi-stage schedule such as Interleaved1F1B"
        )
    if issubclass(cls, V_SCHEDULES) and per_rank != 2:
        raise ConfigError(
            f"--parallelism.{key} gives {per_rank} stages per rank but {_KEY}={pp_config.pipeline_parallel_schedule} "
            "needs exactly 2"
        )
    return n


def fqns_per_stage(
    n_stages: int,
    n_layers: int,
    first_less: int,
    last_less: int,
    input_modules: Sequence[str],
    output_modules: Sequence[str],
    layers_attr: str = "layers",
) -> list[list[str]]:
    """Module FQNs of each stage: the input modules count as `first_less` layers on the first stage, the
    output modules as `last_less` on the last; the (layers + both) units are spread as evenly as possible,
    remainders going to the middle stages first."""
    units = n_layers + first_less + last_less
    base, extra = divmod(units, n_stages)
    sizes = [base] * n_stages
    for i in (list(range(1, n_stages - 1)) + [0, n_stages - 1])[:extra]:
        sizes[i] += 1
    sizes[0] -= first_less
    sizes[-1] -= last_less
    if min(sizes) < 0 or 0 in sizes[1:-1]:
        raise ConfigError(
            f"{n_layers} layers cannot fill {n_stages} pipeline stages with "
            f"pipeline_parallel_first_stage_less_layers={first_less} and _last_stage_less_layers={last_less}; "
            "use fewer stages or smaller *_less_layers"
        )
    result, layer = [], 0
    for i, size in enumerate(sizes):
        names = list(input_modules) if i == 0 else []
        names += [f"{layers_attr}.{k}" for k in range(layer, layer + size)]
        layer += size
        if i == n_stages - 1:
            names += list(output_modules)
        result.append(names)
    return result


def stage_ids_this_rank(pp_rank: int, pp: int, n_stages: int, v_style: bool) -> list[int]:
    """Stages of a rank: r, r + pp, ... (loop), or the V pair (r, n - 1 - r) for V schedules."""
    if v_style:
        return [pp_rank, n_stages - 1 - pp_rank]
    return list(range(pp_rank, n_stages, pp))


def split_module(model: nn.Module, fqns: Sequence[str], layers_attr: str = "layers") -> nn.Module:
    """A copy of (meta) `model` holding only the modules in `fqns` (`stage_modules` paths, blocks); the other
    modules become None, the other blocks are removed from the container."""
    part, keep = copy.deepcopy(model), set(fqns)
    for path in stage_modules(part, layers_attr):
        if path not in keep:
            set_module(part, path, None)
    blocks = block_container(part, layers_attr)
    kept = [k for k in blocks._modules if f"{layers_attr}.{k}" in keep]
    if isinstance(blocks, nn.ModuleDict):
        for k in list(blocks.keys()):
            if k not in kept:
                del blocks[k]
    else:  # a ModuleList renumbers on deletion; hold the kept blocks under their original keys instead
        set_module(part, layers_attr, nn.ModuleDict({k: blocks._modules[k] for k in kept}))
    return part


def check_fqns(model: nn.Module, parts_fqns: list[list[str]], layers_attr: str = "layers") -> None:
    """Every FQN names a module (a `stage_modules` path or a block) and every module is in exactly one stage."""
    known = stage_modules(model, layers_attr)
    known += [f"{layers_attr}.{k}" for k in block_container(model, layers_attr)._modules]
    seen: dict[str, int] = {}
    for i, names in enumerate(parts_fqns):
        for name in names:
            if name not in known:
                raise ConfigError(
                    f"--parallelism.module_fqns_per_model_part: stage {i} names {name!r}, which is not a module "
                    f"of the model; use names such as {', '.join(known[:3])}, ..."
                )
            if name in seen:
                raise ConfigError(
                    f"--parallelism.module_fqns_per_model_part: {name!r} is in stages {seen[name]} and {i}; "
                    "put each module in one stage"
                )
            seen[name] = i
    missing = [n for n in known if n not in seen]
    if missing:
        raise ConfigError(
            f"--parallelism.module_fqns_per_model_part leaves {', '.join(missing)} in no stage; add them"
        )


def microbatch_count(cls: type[_PipelineSchedule], local_batch_size: int, microbatch_size: int,
                     stages_per_rank: int, pp: int) -> int:
    """`local_batch_size / microbatch_size`, with one-line ConfigErrors when it does not divide or is too
    small for the schedule."""
    if local_batch_size % microbatch_size:
        raise ConfigError(
            f"--training.local_batch_size={local_batch_size} must be divisible by "
            f"--parallelism.pipeline_parallel_microbatch_size={microbatch_size}"
        )
    n = local_batch_size // microbatch_size
    needed = pp * stages_per_rank if issubclass(cls, V_SCHEDULES) else stages_per_rank
    if n < needed:
        raise ConfigError(
            f"{cls.__name__} with {stages_per_rank} stages per rank at pipeline_parallel_degree={pp} needs at "
            f"least {needed} microbatches, but training.local_batch_size={local_batch_size} / "
            f"pipeline_parallel_microbatch_size={microbatch_size} = {n}; raise the batch or lower the microbatch size"
        )
    return n


def build_stages(
    model: nn.Module,
    parts_fqns: list[list[str]],
    stage_ids: list[int],
    pp_mesh: DeviceMesh,
    device: torch.device,
    parallelize: Callable[[nn.Module], nn.Module],
    layers_attr: str = "layers",
) -> tuple[list[PipelineStage], list[nn.Module]]:
    """Split `model` for this rank's `stage_ids`, apply `parallelize` to each part (still on meta) and wrap
    each part in a PipelineStage over the PP group."""
    stages, parts = [], []
    for sid in stage_ids:
        part = parallelize(split_module(model, parts_fqns[sid], layers_attr))
        parts.append(part)
        stages.append(PipelineStage(part, sid, len(parts_fqns), device, group=pp_mesh.get_group()))
    return stages, parts


def build_schedule(
    pp_config: Any, stages: list[PipelineStage], n_microbatches: int, loss_fn: Callable
) -> _PipelineSchedule:
    """The named schedule over this rank's stages, or torch's schedule runtime running
    `pipeline_parallel_schedule_csv`. Gradients are not scaled: the loss is already normalized."""
    csv_path = pp_config.pipeline_parallel_schedule_csv
    cls = schedule_class(pp_config.pipeline_parallel_schedule, csv_path)
    if csv_path:
        if not os.path.isfile(csv_path):
            raise ConfigError(f"--parallelism.pipeline_parallel_schedule_csv={csv_path!r} is not a file")
        schedule = _PipelineScheduleRuntime(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
        try:
            schedule._load_csv(csv_path)
        except (ValueError, AssertionError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--parallelism.pipeline_parallel_schedule_csv={csv_path!r} is invalid: {first}") from e
        return schedule
    if is_single_stage(cls):
        return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    try:
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    except ValueError as e:
        raise ConfigError(f"{_KEY}={pp_config.pipeline_parallel_schedule}: {str(e).strip().splitlines()[0]}") from e


def describe_rank(pp_rank: int, stage_ids: list[int], parts_fqns: list[list[str]], schedule: str) -> str:
    """One line: a PP rank's stages and their modules, e.g. for dry runs and logs."""
    stages = "; ".join(f"stage {s}: {_compact(parts_fqns[s])}" for s in stage_ids)
    return f"pp rank {pp_rank} ({schedule}): {stages}"


def _compact(names: list[str]) -> str:
    """['tok_embeddings', 'layers.0', 'layers.1', 'layers.2'] -> 'tok_embeddings, layers.0-2'."""
    out: list[list] = []  # [text, container, first index, last index]
    for name in names:
        head, _, idx = name.rpartition(".")
        if idx.isdigit() and out and out[-1][1] == head and out[-1][3] == int(idx) - 1:
            out[-1][3] = int(idx)
        else:
            out.append([name, head, int(idx), int(idx)] if idx.isdigit() else [name, None, 0, 0])
    return ", ".join(t if first == last else f"{t}-{last}" for t, _, first, last in out)


def plan_stages(model: nn.Module, pp: int, n_layers: int, job_config: Any, input_modules: Sequence[str],
                output_modules: Sequence[str], layers_attr: str = "layers") -> tuple[type, list[list[str]]]:
    """The schedule class and every stage's FQNs (checked against `model`), before any process group."""
    pc = job_config.parallelism
    cls = schedule_class(pc.pipeline_parallel_schedule, pc.pipeline_parallel_schedule_csv)
    n = num_stages(cls, pp, n_layers, pc)
    parts_fqns = pc.module_fqns_per_model_part or fqns_per_stage(
        n, n_layers, pc.pipeline_parallel_first_stage_less_layers, pc.pipeline_parallel_last_stage_less_layers,
        input_modules, output_modules, layers_attr,
    )
    check_fqns(model, parts_fqns, layers_attr)
    microbatch_count(cls, job_config.training.local_batch_size, pc.pipeline_parallel_microbatch_size, n // pp, pp)
    return cls, parts_fqns


def pipeline_model(
    model: nn.Module,
    parallel_dims: Any,
    job_config: Any,
    device: torch.device,
    parallelize_fn: Callable,
    loss_fn: Callable,
    input_modules: Sequence[str],
    output_modules: Sequence[str],
    layers_attr: str = "layers",
) -> tuple[_PipelineSchedule, list[nn.Module], bool, bool, TiedParameters]:
    """Split `model` into this PP rank's stages, parallelize each with `parallelize_fn(part, parallel_dims,
    job_config)`, and build the schedule. Returns (schedule, model parts, has first stage, has last stage,
    the parameters `model` ties across stages, e.g. a tied embedding and output head)."""
    pp, pc = parallel_dims.pp, job_config.parallelism
    n_layers = len(block_container(model, layers_attr))
    cls, parts_fqns = plan_stages(model, pp, n_layers, job_config, input_modules, output_modules, layers_attr)
    pp_mesh = parallel_dims.get_mesh("pp")
    pp_rank, v_style = pp_mesh.get_local_rank(), issubclass(cls, V_SCHEDULES)
    stage_ids = stage_ids_this_rank(pp_rank, pp, len(parts_fqns), v_style)
    stages, parts = build_stages(
        model, parts_fqns, stage_ids, pp_mesh, device,
        lambda part: parallelize_fn(part, parallel_dims, job_config), layers_attr,
    )
    rank_of_stage = {s: r for r in range(pp) for s in stage_ids_this_rank(r, pp, len(parts_fqns), v_style)}
    tied = TiedParameters(model, parts_fqns, rank_of_stage, stage_ids, parts, pp_mesh, parallel_dims.world_mesh)
    n_micro = job_config.training.local_batch_size // pc.pipeline_parallel_microbatch_size
    schedule = build_schedule(pc, stages, n_micro, loss_fn)
    name = os.path.basename(pc.pipeline_parallel_schedule_csv or "") or cls.__name__
    logger.info(describe_rank(pp_rank, stage_ids, parts_fqns, f"{name}, {n_micro} microbatches"))
    return schedule, parts, any(s.is_first for s in stages), any(s.is_last for s in stages), tied
