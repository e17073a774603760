"""Estimate per-rank peak memory of a job, or suggest layouts that fit a device.

    python scripts/estimate/estimation.py --job.config_file F [overrides] --estimate.world_size 8
    python scripts/estimate/estimation.py --job.config_file F --estimate.suggest --estimate.world_size 64 \
        --estimate.device_memory_gib 80

The first form runs one train step (forward, backward, optimizer) of the job's own layout in FakeTensorMode over
a fake process group (nothing is allocated) and prints its MemTracker tally next to the analytic breakdown.
The second enumerates layouts (FSDP/HSDP, TP, PP, CP, AC mode) with the analytic model only, prints those that
fit ranked by communication volume, and the best one as a command line. See docs/memory_estimation.md.
"""

import argparse
import sys

import torchtitan.builtins  # noqa: F401  (registers the built-in models)
from torchtitan.config import ConfigError, ConfigManager, JobConfig
from torchtitan.distributed.fake_backend import fake_world_size
from torchtitan.tools.layout_planner import command_line, format_plans, plan
from torchtitan.tools.logging import init_logger
from torchtitan.tools.memory_estimation import estimate_memory, format_table, job_shape


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, JobConfig]:
    """The --estimate.* options, and the job config built from every other argument."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--estimate.world_size", dest="world_size", type=int, default=None,
                        help="ranks to estimate for (default: NGPU or WORLD_SIZE, else 1)")
    parser.add_argument("--estimate.suggest", dest="suggest", action="store_true",
                        help="list the layouts that fit instead of estimating the job's own")
    parser.add_argument("--estimate.device_memory_gib", dest="device_memory_gib", type=float, default=None,
                        help="memory per device in GiB (required with --estimate.suggest)")
    parser.add_argument("--estimate.top", dest="top", type=int, default=10, help="rows to print with --suggest")
    args, rest = parser.parse_known_args(argv)
    if args.world_size is None:
        args.world_size = fake_world_size()
    if args.world_size < 1:
        raise ConfigError(f"--estimate.world_size={args.world_size} is invalid; fix: use a value >= 1")
    if args.suggest and not (args.device_memory_gib and args.device_memory_gib > 0):
        raise ConfigError(
            f"--estimate.device_memory_gib={args.device_memory_gib} is invalid with --estimate.suggest; fix: give "
            "the memory of one device in GiB, e.g. 80"
        )
    return args, ConfigManager().parse_args(rest)


def suggest(job_config: JobConfig, world_size: int, device_memory_gib: float, top: int) -> str:
    """The planner's report: the fitting layouts and the best one's command line."""
    args, shape = job_shape(job_config, device_type="cuda")  # planning for accelerators
    tc = job_config.training
    plans = plan(shape, args.n_heads, args.kv_heads, world_size, device_memory_gib,
                 job_config.parallelism.pipeline_parallel_microbatch_size)
    title = (f"{job_config.model.name}/{job_config.model.flavor}, seq_len {tc.seq_len}, local batch "
             f"{tc.local_batch_size}, {world_size} ranks of {device_memory_gib:g} GiB")
    if not plans:
        return f"{title}: no layout fits; use more ranks, a shorter seq_len or a smaller local batch"
    return (f"{title}: {len(plans)} layouts fit, cheapest communication first\n{format_plans(plans, top)}\n"
            f"best: {command_line(plans[0], job_config, world_size)}")


def report(args: argparse.Namespace, job_config: JobConfig) -> str:
    """The planner's suggestions, or the estimate table of the job's own layout."""
    if args.suggest:
        return suggest(job_config, args.world_size, args.device_memory_gib, args.top)
    estimate = estimate_memory(job_config, args.world_size)
    title = f"{job_config.model.name}/{job_config.model.flavor} at world size {args.world_size}:"
    return f"{title}\n{format_table(estimate, args.device_memory_gib)}"


def main(argv: list[str] | None = None) -> int:
    """Print the report; a config or input problem prints one `error:` line and returns 2."""
    init_logger()
    try:
        print(report(*parse_args(argv)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
