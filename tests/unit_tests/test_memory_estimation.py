"""Memory estimation: the FakeTensorMode tally and the analytic model within 25% of a measured CPU step, the
estimator CLI under a fake 8-rank FSDP layout, the layout planner for every Llama 3 flavor (405B in
seconds), and one-line errors."""

import re
import time

import pytest

from scripts.estimate import estimation
from torchtitan.config import ConfigManager
from torchtitan.tools.memory_estimation import analytic_breakdown, fake_step_tally, job_layout, measure_cpu_peak
from torchtitan.tools.memory_model import GIB

SMALL = ["--training.seq_len", "128", "--training.local_batch_size", "2", "--training.mixed_precision_param",
         "float32", "--training.dataset", "shakespeare"]
CONFIGS = "torchtitan/models/llama3/train_configs"


@pytest.mark.parametrize("ac", ["full"])
def test_estimates_within_25_percent_of_the_measured_peak(ac):
    job = ConfigManager().parse_args([*SMALL, "--activation_checkpoint.mode", ac])
    measured = measure_cpu_peak(job)
    fake = fake_step_tally(job, 1)["peak"]
    analytic = analytic_breakdown(job, job_layout(job, 1))["peak"]
    for name, estimate in (("fake step", fake), ("analytic", analytic)):
        assert abs(estimate - measured) <= 0.25 * measured, (name, estimate, measured)


def test_cli_table_under_fake_fsdp8(capsys):
    assert estimation.main([*SMALL, "--estimate.world_size", "8", "--estimate.device_memory_gib", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line and line[0].isalpha()}
    one = analytic_breakdown(ConfigManager().parse_args(SMALL), job_layout(ConfigManager().parse_args(SMALL), 1))
    assert float(rows["params"][1]) == pytest.approx(one["params"] / 8 / GIB, abs=1e-3)  # sharded 8 ways
    fake_peak, analytic_peak = (float(v) for v in rows["peak"])
    assert abs(analytic_peak - fake_peak) <= 0.25 * fake_peak
    assert "device memory 1 GiB -> fake_step: fits, analytic: fits" in out


def _plan_rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if re.match(r"^\s+\d+ ", line)]


@pytest.mark.parametrize(
    "config, world, memory",
    [("debug_model.toml", 2, 1), ("llama3_8b.toml", 8, 80), ("llama3_70b.toml", 64, 80), ("llama3_405b.toml", 512, 80)],
)
def test_planner_lists_fitting_layouts_cheapest_first(config, world, memory, capsys):
    start = time.perf_counter()
    argv = ["--job.config_file", f"{CONFIGS}/{config}", "--estimate.suggest", "--estimate.world_size", str(world),
            "--estimate.device_memory_gib", str(memory), "--estimate.top", "1000"]
    assert estimation.main(argv) == 0
    assert time.perf_counter() - start < 10
    out = capsys.readouterr().out
    rows = _plan_rows(out)
    assert rows, out
    for _, rep, shard, tp, pp, cp, _, peak, _, _ in rows:
        assert int(rep) * int(shard) * int(tp) * int(pp) * int(cp) == world
        assert float(peak) <= memory
    per_token = [float(r[-1]) for r in rows]
    assert per_token == sorted(per_token)
    best = rows[0]
    command = out.split("best: ", 1)[1]
    for flag, value in zip(["data_parallel_replicate_degree", "data_parallel_shard_degree", "tensor_parallel_degree",
                            "pipeline_parallel_degree", "context_parallel_degree"], best[1:6]):
        assert f"--parallelism.{flag} {value} " in command


def test_planner_says_when_nothing_fits(capsys):
    argv = ["--job.config_file", f"{CONFIGS}/llama3_405b.toml", "--estimate.suggest", "--estimate.world_size", "8",
            "--estimate.device_memory_gib", "80"]
    assert estimation.main(argv) == 0
    assert "no layout fits" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--estimate.suggest", "--estimate.world_size", "8"], "--estimate.device_memory_gib=None is invalid"),
        (["--estimate.world_size", "0"], "--estimate.world_size=0 is invalid"),
        (["--estimate.world_size", "4", "--parallelism.tensor_parallel_degree", "3"], "tensor_parallel_degree"),
    ],
)
def test_errors_exit_2_with_one_line(argv, message, capsys):
    assert estimation.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
