"""Run jobs through `run_train.sh` as a user would, and read back what they wrote."""

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = REPO / "torchtitan/models/llama3/train_configs/debug_model.toml"

# A tiny, fast, exact (fp32) job shared by the integration tests; each test adds its overrides.
TINY = [
    "--training.seq_len", "64",
    "--training.local_batch_size", "4",
    "--training.steps", "6",
    "--training.mixed_precision_param", "float32",
    "--lr_scheduler.warmup_steps", "2",
    "--metrics.log_freq", "1",
    "--debug.seed", "42",
    "--debug.deterministic",
]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    dump_folder: Path

    def metrics(self, split: str | None = None) -> list[dict]:
        """The metrics.jsonl records of this run (training records unless `split` is given)."""
        path = self.dump_folder / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in records if r.get("split") == split]

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.metrics()}


def run_train(
    dump_folder: Path,
    *overrides: str,
    ngpu: int = 1,
    config: Path = DEBUG_CONFIG,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: int = 600,
) -> Run:
    """Launch `./run_train.sh` with NGPU CPU processes; fail the test with the log if it fails."""
    full_env = {
        **os.environ,
        "NGPU": str(ngpu),
        "CONFIG_FILE": str(config),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    proc = subprocess.run(
        ["./run_train.sh", "--job.dump_folder", str(dump_folder), *overrides],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    run = Run(proc.returncode, proc.stdout, proc.stderr, Path(dump_folder))
    if check and proc.returncode != 0:
        raise AssertionError(
            f"run_train.sh {' '.join(overrides)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return run
