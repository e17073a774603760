"""Parallel throughput on CPU: FSDP 2, TP 2 and DDP 2 against one process with the same global batch.

    python benchmarks/parallel_throughput.py [--steps 20] [--seq-len 128] [--global-batch 8] [--warmup 3]

Every job is the debug Llama in float32, launched through ./run_train.sh exactly as a user would: the
parallel layouts run 2 processes over gloo with one intra-op thread each (OMP_NUM_THREADS=1); the
reference runs 1 process with OMP_NUM_THREADS=2, so both sides use the same 2 cores. Each data-parallel
rank gets global_batch / dp sequences, so every job trains on the same samples per step.

Throughput comes from each job's metrics.jsonl (logged every step): `tps` is per device, so a job's
total is tps x processes, time-weighted over the steps after `--warmup` and before the profiled ones.
The machine may be shared: while a job runs, this script samples the CPU time of its processes each
time a step is logged, and reports how many cores the job actually got and its tokens per CPU-second.
The last PROFILED_STEPS + 1 steps run under torch.profiler (1 warm-up, PROFILED_STEPS recorded); each
rank's trace is split on its training thread into compute, collectives and other time (see `split`).
"""

import argparse
import contextlib
import glob
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILED_STEPS = 2
POLL_S = 0.05  # how often the job's logged step and CPU time are sampled

# Substrings (matched case-insensitively) naming a collective or communication event in a trace.
COMM_PATTERNS = (
    "c10d", "gloo", "nccl", "record_param_comms", "all_reduce", "allreduce", "all_gather", "allgather",
    "reduce_scatter", "reducescatter", "all_to_all", "alltoall", "broadcast", "barrier",
)

Intervals = list[tuple[float, float]]


@dataclass
class Layout:
    name: str
    key: str  # its dump folder under --out
    ngpu: int
    dp: int
    threads: int
    flags: list[str] = field(default_factory=list)


SINGLE = ["--parallelism.data_parallel_shard_degree", "1"]
LAYOUTS = [
    Layout("1 process, 2 threads (reference)", "single_2threads", 1, 1, 2, SINGLE),
    # One intra-op thread never waits at an OpenMP barrier for a preempted sibling thread, which on a
    # shared, loaded machine makes it faster than the 2-thread reference; shown so that effect is visible.
    Layout("1 process, 1 thread", "single_1thread", 1, 1, 1, SINGLE),
    Layout("FSDP 2", "fsdp2", 2, 2, 1, ["--parallelism.data_parallel_shard_degree", "2"]),
    Layout("TP 2", "tp2", 2, 1, 1, [*SINGLE, "--parallelism.tensor_parallel_degree", "2"]),
    Layout("DDP 2", "ddp2", 2, 2, 1, ["--parallelism.data_parallel_replicate_degree", "2", *SINGLE]),
]


# ---- interval arithmetic (microseconds) ----
def union(intervals: Intervals) -> Intervals:
    """Merge overlapping intervals, so nested or concurrent events count once."""
    merged: Intervals = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def intersect(a: Intervals, b: Intervals) -> Intervals:
    """Intersection of two merged interval lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Intervals, b: Intervals) -> Intervals:
    """The parts of merged intervals `a` outside merged intervals `b`."""
    out = []
    for start, end in a:
        for b_start, b_end in b:
            if b_end <= start or b_start >= end:
                continue
            if b_start > start:
                out.append((start, b_start))
            start = max(start, b_end)
        if start < end:
            out.append((start, end))
    return out


def total(intervals: Intervals) -> float:
    return sum(end - start for start, end in intervals)


# ---- trace analysis ----
def is_comm(name: str) -> bool:
    lowered = name.lower()
    return any(p in lowered for p in COMM_PATTERNS)


def split(trace_path: str) -> dict[str, float]:
    """Milliseconds per profiled step on this rank's training thread (the one running `ProfilerStep#N`).

    - comm: union of (a) training-thread events named like a collective (launches, FSDP copy-in/out,
      blocking gloo calls and the waits FSDP wraps in its `all_gather` annotations) and (b) collective
      events on gloo's worker threads (the time each collective is actually in flight);
    - compute: union of the training thread's `aten::` ops outside (a);
    - exposed comm: comm while the training thread computes nothing (what communication costs);
    - other: the rest of the step (Python, dataloader, optimizer bookkeeping, unlabelled waits).
    Unions make nested events (an aten::copy_ inside fsdp::all_gather_copy_in) count once.
    """
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    main_tid = steps[0]["tid"]
    window = union([(e["ts"], e["ts"] + e["dur"]) for e in steps])

    def spans(keep) -> Intervals:
        return intersect(union([(e["ts"], e["ts"] + e["dur"]) for e in events if keep(e)]), window)

    main_comm = spans(lambda e: e["tid"] == main_tid and is_comm(e["name"]))
    worker_comm = spans(lambda e: e["tid"] != main_tid and is_comm(e["name"]))
    aten = spans(lambda e: e["tid"] == main_tid and e["name"].startswith("aten::"))
    compute = subtract(aten, main_comm)
    comm = union(main_comm + worker_comm)
    exposed = subtract(comm, compute)
    step = total(window)
    ms = 1e-3 / len(steps)
    return {
        "step": step * ms,
        "compute": total(compute) * ms,
        "comm": total(comm) * ms,
        "exposed": total(exposed) * ms,
        "other": (step - total(compute) - total(exposed)) * ms,
    }


# ---- jobs ----
@dataclass
class Job:
    records: list[dict]  # metrics.jsonl training records
    traces: list[str]  # rank{r}_trace.json of the last profiled iteration
    marks: dict[int, tuple[float, float]]  # step -> (wall seconds, CPU seconds of the job) when it was logged

    def window(self, ngpu: int, first: int, last: int) -> dict[str, float]:
        """Throughput over steps first..last: tokens/s of all processes (time-weighted over the logged
        step times), mean step ms, and, from the CPU samples, cores the job got and tokens per CPU-second."""
        steps = [r for r in self.records if first <= r["step"] <= last]
        seconds = sum(r["step_time_s"] for r in steps)
        tokens = ngpu * sum(r["tps"] * r["step_time_s"] for r in steps)
        out = {"tps": tokens / seconds, "step_ms": 1e3 * seconds / len(steps), "cores": math.nan, "tpcs": math.nan}
        if first - 1 in self.marks and last in self.marks:
            (wall0, cpu0), (wall1, cpu1) = self.marks[first - 1], self.marks[last]
            out["cores"] = (cpu1 - cpu0) / (wall1 - wall0)
            out["tpcs"] = tokens / (cpu1 - cpu0)
        return out


def _descendants(root: int) -> list[int]:
    """Processes below `root` (torchrun's workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes (all their threads) so far."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _last_logged_step(metrics: Path) -> int:
    complete = [line for line in metrics.read_text().split("\n")[:-1] if line.strip()]
    train = [r for r in map(json.loads, complete) if r.get("split") is None]
    return train[-1]["step"] if train else 0


def run_job(layout: Layout, folder: Path, args: argparse.Namespace) -> Job:
    """Run one layout through run_train.sh, sampling its CPU time each time a step is logged."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    overrides = [
        "--job.dump_folder", str(folder),
        "--training.steps", str(args.steps),
        "--training.seq_len", str(args.seq_len),
        "--training.local_batch_size", str(args.global_batch // layout.dp),
        "--training.mixed_precision_param", "float32",
        "--metrics.log_freq", "1",
        "--profiling.enable_profiling",
        "--profiling.profile_freq", str(args.steps),
        "--profiling.profiler_warmup", "1",
        "--profiling.profiler_active", str(PROFILED_STEPS),
        *layout.flags,
    ]
    env = {
        **os.environ,
        "NGPU": str(layout.ngpu),
        "OMP_NUM_THREADS": str(layout.threads),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    cmd = ["./run_train.sh", *overrides]
    log = folder / "console.log"
    metrics = folder / "metrics.jsonl"
    marks: dict[int, tuple[float, float]] = {}
    pids: list[int] = []
    deadline = time.monotonic() + args.timeout
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(POLL_S)
            if not metrics.exists():  # written once the trainer is built: every worker exists by then
                continue
            pids = pids or [proc.pid, *_descendants(proc.pid)]
            step = _last_logged_step(metrics)
            if step not in marks:
                marks[step] = (time.monotonic(), _cpu_seconds(pids))
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(
            f"NGPU={layout.ngpu} OMP_NUM_THREADS={layout.threads} {' '.join(cmd)} "
            f"exited {proc.returncode}{' (timed out)' if time.monotonic() > deadline else ''}; last lines:\n{tail}"
        )
    records = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("split") is None]
    iterations = sorted(
        glob.glob(str(folder / "profile_traces" / "iteration_*")), key=lambda p: int(p.rsplit("_", 1)[1])
    )
    traces = sorted(glob.glob(os.path.join(iterations[-1], "rank*_trace.json"))) if iterations else []
    return Job(records, traces, marks)


def machine() -> str:
    """CPU model name and core count."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return f"{model}, {os.cpu_count()} cores"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the throughput")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per step, split over dp ranks")
    parser.add_argument("--out", default="/tmp/tt_parallel_throughput", help="dump folders go under here")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per job")
    args = parser.parse_args()
    last_timed = args.steps - PROFILED_STEPS - 1
    if last_timed <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup} and the "
                     f"{PROFILED_STEPS + 1} profiled steps; raise --steps")

    print(f"machine: {machine()}; load average before: {os.getloadavg()[0]:.2f}")
    print(f"debug model fp32, seq_len {args.seq_len}, global batch {args.global_batch} sequences; "
          f"throughput over steps {args.warmup + 1}..{last_timed} of {args.steps}")
    print("reference: 1 process with OMP_NUM_THREADS=2 (both cores, as the 2-rank jobs use with 1 thread each); "
          "also shown: 1 process with OMP_NUM_THREADS=1")
    results: dict[str, tuple[Layout, dict[str, float], list[dict[str, float]]]] = {}
    failures = []
    for layout in LAYOUTS:
        try:
            job = run_job(layout, Path(args.out) / layout.key, args)
        except RuntimeError as e:
            failures.append(f"{layout.name}: {e}")
            continue
        window = job.window(layout.ngpu, args.warmup + 1, last_timed)
        results[layout.name] = (layout, window, [split(t) for t in job.traces])
        print(f"  done: {layout.name}: {window['tps']:.0f} tokens/s")

    ref2, ref1 = (results[layout.name][1] if layout.name in results else None for layout in LAYOUTS[:2])

    def ratio(w: dict[str, float], ref: dict[str, float] | None, key: str) -> str:
        return f"{w[key] / ref[key]:.2f}" if ref else "n/a"

    print("\n| layout | processes x threads | local batch | tokens/s (all processes) | vs 1 process x 2 threads "
          "| vs 1 process x 1 thread | step ms | cores the job got | tokens per CPU-second | "
          "per CPU-second vs 1 process x 1 thread |")
    print("| --- " * 10 + "|")
    for layout, w, _ in results.values():
        print(f"| {layout.name} | {layout.ngpu} x {layout.threads} | {args.global_batch // layout.dp} | "
              f"{w['tps']:.0f} | {ratio(w, ref2, 'tps')} | {ratio(w, ref1, 'tps')} | {w['step_ms']:.0f} | "
              f"{w['cores']:.2f} | {w['tpcs']:.0f} | {ratio(w, ref1, 'tpcs')} |")

    print(f"\nprofiled steps {args.steps - PROFILED_STEPS + 1}..{args.steps}, ms per step "
          "(% of step) on each rank's training thread:")
    print("| layout | rank | step | compute | comm in flight | comm exposed | other |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for layout, _, splits in results.values():
        for rank, s in enumerate(splits):
            pct = {k: 100 * v / s["step"] for k, v in s.items()}
            cells = " | ".join(f"{s[k]:.0f} ({pct[k]:.0f}%)" for k in ("compute", "comm", "exposed", "other"))
            print(f"| {layout.name} | {rank} | {s['step']:.0f} | {cells} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    for failure in failures:
        print(f"\nFAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
