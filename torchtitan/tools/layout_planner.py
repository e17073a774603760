"""The layout planner: every layout of `world_size` ranks that fits a device, cheapest communication first.

A layout is (HSDP replicas x FSDP shards) x TP x PP x CP and an AC mode. Candidates: TP and CP up to 8 (one
node), dividing the head counts (TP) and seq_len into 2*CP chunks; PP up to 16 stages, at most one per layer
and at most the number of microbatches (local batch / microbatch size), so that the 1F1B pipeline fills.
Each is scored with the analytic `memory_model`: it fits when its estimated peak is within the device memory.
Layouts differ in their global batch (local batch x data-parallel degree), so fitting layouts are ranked by
the bytes a rank sends per training token, then by the recomputation their AC mode costs, then by peak memory.
"""

from dataclasses import dataclass
from typing import Any

from torchtitan.tools.memory_model import GIB, Layout, Shape, breakdown, comm_volume

AC_MODES = ("none", "op", "selective", "full")  # increasing recomputation
_MAX_INTRA_NODE = 8
_MAX_PP = 16


@dataclass(frozen=True)
class Plan:
    layout: Layout
    peak_gib: float
    comm_gib: float  # sent by one rank per step
    comm_kib_per_token: float  # the same per training token of the global batch


def _divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, (limit or n) + 1) if n % d == 0]


def candidate_layouts(
    world_size: int, n_heads: int, n_kv_heads: int, n_layers: int, seq_len: int, microbatches: int
) -> list[Layout]:
    """Every layout of exactly `world_size` ranks the model, sequence length and microbatch count allow."""
    layouts = []
    for tp in _divisors(world_size, _MAX_INTRA_NODE):
        if n_heads % tp or n_kv_heads % tp:
            continue
        for pp in _divisors(world_size // tp, _MAX_PP):
            if pp > n_layers or (pp > 1 and pp > microbatches):
                continue
            for cp in _divisors(world_size // (tp * pp), _MAX_INTRA_NODE):
                if seq_len % (2 * cp) and cp > 1:
                    continue
                dp = world_size // (tp * pp * cp)
                for shard in _divisors(dp):
                    for ac in AC_MODES:
                        layouts.append(Layout(dp // shard, shard, tp, pp, cp, ac))
    return layouts


def plan(shape: Shape, n_heads: int, n_kv_heads: int, world_size: int, device_memory_gib: float,
         microbatch: int = 1) -> list[Plan]:
    """The layouts that fit `device_memory_gib`, best first (see the module docstring)."""
    plans = []
    microbatches = max(1, shape.local_batch // microbatch)
    for layout in candidate_layouts(world_size, n_heads, n_kv_heads, shape.n_layers, shape.seq_len, microbatches):
        peak = breakdown(shape, layout, microbatch)["peak"] / GIB
        if peak <= device_memory_gib:
            volume = comm_volume(shape, layout)
            tokens = shape.local_batch * shape.seq_len * layout.dp_replicate * layout.dp_shard
            plans.append(Plan(layout, peak, volume / GIB, volume / tokens / 1024))
    return sorted(plans, key=lambda p: (round(p.comm_kib_per_token, 6), AC_MODES.index(p.layout.ac), p.peak_gib))


def format_plans(plans: list[Plan], top: int) -> str:
    """The first `top` plans as a table."""
    header = f"{'rank':>4} {'dp_rep':>6} {'dp_shard':>8} {'tp':>3} {'pp':>3} {'cp':>3} {'ac':>10} " \
             f"{'peak GiB':>9} {'comm GiB/step':>14} {'comm KiB/token':>15}"
    rows = [header]
    for i, p in enumerate(plans[:top], 1):
        lay = p.layout
        rows.append(f"{i:>4} {lay.dp_replicate:>6} {lay.dp_shard:>8} {lay.tp:>3} {lay.pp:>3} {lay.cp:>3} "
                    f"{lay.ac:>10} {p.peak_gib:>9.2f} {p.comm_gib:>14.2f} {p.comm_kib_per_token:>15.1f}")
    return "\n".join(rows)


def command_line(best: Plan, job_config: Any, world_size: int) -> str:
    """The command that trains the job under `best`: run_train.sh on one node of up to 8 devices, else
    multinode_trainer.slurm on world_size / 8 nodes of 8."""
    config = job_config.job.config_file or "<your config>"
    flags = " ".join([
        "--model.flavor", job_config.model.flavor, "--training.seq_len", str(job_config.training.seq_len),
        "--training.local_batch_size", str(job_config.training.local_batch_size), *best.layout.flags(),
    ])
    if world_size <= _MAX_INTRA_NODE:
        return f"NGPU={world_size} CONFIG_FILE={config} ./run_train.sh {flags}"
    return f"CONFIG_FILE={config} sbatch --nodes={-(-world_size // _MAX_INTRA_NODE)} multinode_trainer.slurm {flags}"
