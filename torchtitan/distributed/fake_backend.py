"""Dry runs with a fake process group: validate a layout for many ranks in one process, no training.

`python -m torchtitan.distributed.fake_backend --job.config_file X.toml --parallelism...` with the
world size in NGPU (or WORLD_SIZE); the trainer calls `dry_run` when `comm.mode == "fake_backend"`.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchtitan.config.errors import ConfigError
from torchtitan.distributed.context_parallel import build_context_parallel
from torchtitan.distributed.module_paths import block_container
from torchtitan.distributed.parallel_dims import ParallelDims, validate_model
from torchtitan.tools.logging import get_logger, init_logger

logger = get_logger(__name__)
_BLOCK_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # `layers.3.` (ours) or `model.layers.3.` (HF)


def fake_world_size() -> int:
    """World size a dry run simulates: NGPU, else WORLD_SIZE, else 1."""
    for var in ("NGPU", "WORLD_SIZE"):
        value = os.environ.get(var)
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{var}={value!r} is not a valid world size for the fake backend; use e.g. {var}=8")
            return int(value)
    return 1


def init_fake_process_group(world_size: int, rank: int = 0) -> None:
    """Default process group that hallucinates every collective (rank `rank` of `world_size`)."""
    # Importing this module registers the "fake" backend with c10d.
    import torch.testing._internal.distributed.fake_pg  # noqa: F401

    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)


def _layout_lines(model: torch.nn.Module) -> list[str]:
    """One line per parameter outside the blocks and per parameter of block 0: shapes and placements."""
    lines = []
    for name, p in model.named_parameters():
        clean = name.replace("_checkpoint_wrapped_module.", "")
        block = _BLOCK_INDEX.search(clean)
        if block is not None and block.group(1) != "0":
            continue
        if isinstance(p, DTensor):
            where = f"local {tuple(p.to_local().shape)} {p.placements} on {p.device_mesh.mesh_dim_names}"
        else:
            where = "replicated (plain tensor)"
        lines.append(f"  {clean}: global {tuple(p.shape)}, {where}")
    return lines


def _pipeline_rank0(model: torch.nn.Module, parallel_dims: ParallelDims, job_config: Any,
                    spec: Any) -> list[torch.nn.Module]:
    """Log every PP rank's stages, their layers and the schedule; return rank 0's parts, parallelized."""
    from torchtitan.distributed import pipeline_parallel as ppl

    fn = spec.pipelining_fn
    if fn is None:
        raise ConfigError(f"--parallelism.pipeline_parallel_degree={parallel_dims.pp}: model "
                          f"{job_config.model.name} has no pipelining_fn; set it to 1")
    # The model's module paths, bound in its pipelining_fn (a functools.partial of `pipeline_model`).
    names = getattr(fn, "keywords", None) or {}
    if not {"input_modules", "output_modules", "layers_attr"} <= names.keys():
        raise ConfigError(f"model {job_config.model.name}: its pipelining_fn does not bind input_modules, "
                          "output_modules and layers_attr, so the fake backend cannot plan its stages; "
                          "set --parallelism.pipeline_parallel_degree=1")
    pp, pc = parallel_dims.pp, job_config.parallelism
    layers_attr = names["layers_attr"]
    cls, parts_fqns = ppl.plan_stages(model, pp, len(block_container(model, layers_attr)), job_config,
                                      names["input_modules"], names["output_modules"], layers_attr)
    n_micro = job_config.training.local_batch_size // pc.pipeline_parallel_microbatch_size
    v_style = issubclass(cls, ppl.V_SCHEDULES)
    schedule = f"{cls.__name__}, {n_micro} microbatches"
    for rank in range(pp):
        stage_ids = ppl.stage_ids_this_rank(rank, pp, len(parts_fqns), v_style)
        logger.info("[fake_backend] " + ppl.describe_rank(rank, stage_ids, parts_fqns, schedule))
    return [
        spec.parallelize_fn(ppl.split_module(model, parts_fqns[sid], layers_attr), parallel_dims, job_config)
        for sid in ppl.stage_ids_this_rank(0, pp, len(parts_fqns), v_style)
    ]


def dry_run(job_config: Any, world_size: int | None = None) -> dict[str, Any]:
    """Validate `job_config` for `world_size` ranks (default: `fake_world_size()`) as rank 0 would.

    Builds ParallelDims and the mesh over a fake process group, the model on the meta device with its
    converters, applies the model's parallelize_fn, and logs the layout and the per-rank parameter
    count. Runs no step. Invalid layouts raise the same one-line ConfigErrors as a real run.
    Returns {"world_size", "params", "params_per_rank"}.
    """
    from torchtitan.protocols.model_converter import build_model_converters
    from torchtitan.protocols.train_spec import build_meta_model, get_train_spec

    world_size = world_size or fake_world_size()
    parallel_dims = ParallelDims.from_job_config(job_config, world_size)
    spec = get_train_spec(job_config.model.name)
    model_args, model = build_meta_model(spec, job_config, spec.build_tokenizer_fn(job_config))
    validate_model(parallel_dims, model_args, job_config)

    owns_group = not dist.is_initialized()
    if owns_group and world_size > 1:
        init_fake_process_group(world_size)
    try:
        parallel_dims.build_mesh()
        build_model_converters(job_config, parallel_dims).convert(model)
        total = sum(p.numel() for p in model.parameters())
        if parallel_dims.pp_enabled:
            parts = _pipeline_rank0(model, parallel_dims, job_config, spec)
        else:
            parts = [spec.parallelize_fn(model, parallel_dims, job_config)]
        params = [p for part in parts for p in part.parameters()]
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
        mesh = parallel_dims.world_mesh
        logger.info(f"[fake_backend] {parallel_dims.describe()}")
        logger.info(f"[fake_backend] mesh: {None if mesh is None else dict(zip(mesh.mesh_dim_names, mesh.shape))}")
        logger.info(f"[fake_backend] model {job_config.model.name}/{job_config.model.flavor}: {total:,} parameters, "
                    f"{local:,} on rank 0")
        logger.info("[fake_backend] parameter layout (rank 0):\n" + "\n".join(line for part in parts for line in _layout_lines(part)))
        cp = build_context_parallel(parallel_dims, job_config, "cuda" if torch.cuda.is_available() else "cpu")
        if cp is not None:
            logger.info(f"[fake_backend] {cp.describe(job_config.training.seq_len)}")
        logger.info("[fake_backend] dry run OK: the layout is valid; no step was run")
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
    return {"world_size": world_size, "params": total, "params_per_rank": local}


def main(argv: list[str] | None = None) -> int:
    """CLI: parse a job config, dry-run it; a ConfigError prints one line and returns 2."""
    import torchtitan.builtins  # noqa: F401  (this CLI is a composition root)
    from torchtitan.config import ConfigManager

    init_logger()
    try:
        dry_run(ConfigManager().parse_args(argv))
    except ConfigError as e:
        print(f"ConfigError: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
