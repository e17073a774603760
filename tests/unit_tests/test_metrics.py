"""MetricsProcessor: values of a scripted sequence of steps in metrics.jsonl, console, TensorBoard and offline W&B."""

import io
import json
import logging
import resource
from types import SimpleNamespace

import pytest
import torch

from torchtitan.components import metrics
from torchtitan.components.metrics import build_metrics_processor
from torchtitan.config import JobConfig
from torchtitan.tools import utils
from torchtitan.tools.logging import logger as torchtitan_logger

FLOPS_PER_TOKEN = 6e9


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(metrics, "_now", fake)
    return fake


def _job_config(tmp_path, **metrics_overrides) -> JobConfig:
    job_config = JobConfig()
    job_config.job.dump_folder = str(tmp_path)
    job_config.training.steps = 5
    job_config.metrics.log_freq = 2
    job_config.metrics.disable_color_printing = True
    job_config.metrics.cpu_peak_tflops = 3.0
    for key, value in metrics_overrides.items():
        setattr(job_config.metrics, key, value)
    return job_config


def _processor(job_config, rank_is_logging=True, model_parallel=2):
    dims = SimpleNamespace(non_data_parallel_size=model_parallel)
    return build_metrics_processor(job_config, dims, FLOPS_PER_TOKEN, torch.device("cpu"), rank_is_logging)


def _run_script(processor, clock) -> None:
    """Steps 1..5 with log_freq 2: logs at 1 (2 s, 1000 tokens), 2 (4 s, 2000), 4 (4 s, 4000), 5 (1 s, 500)."""
    windows = {1: (2.0, 1000, [0.1, 0.2]), 2: (4.0, 2000, [0.4]), 4: (4.0, 4000, [0.2, 0.2]), 5: (1.0, 500, [0.05])}
    for step in range(1, 6):
        if step in windows:
            seconds, tokens, loading = windows[step]
            processor.ntokens_since_last_log += tokens
            processor.data_loading_times.extend(loading)
            clock.now += seconds
        assert processor.should_log(step) == (step in windows)
        if step in windows:
            processor.log(step, 10.0 / step, 12.0 / step, torch.tensor(0.5 * step), lr=1e-3 * step)
    processor.log_validation(4, 2.5, perplexity=12.18, n_tokens=4096, time_s=0.5)


def _read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_jsonl_records(tmp_path, clock):
    processor = _processor(_job_config(tmp_path))
    _run_script(processor, clock)
    processor.close()
    records = _read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in records if "split" not in r]
    assert [r["step"] for r in train] == [1, 2, 4, 5]
    assert [r["loss"] for r in train] == [10.0, 5.0, 2.5, 2.0]
    assert [r["max_loss"] for r in train] == [12.0, 6.0, 3.0, 2.4]
    assert [r["grad_norm"] for r in train] == [0.5, 1.0, 2.0, 2.5]
    assert [r["lr"] for r in train] == pytest.approx([1e-3, 2e-3, 4e-3, 5e-3])
    # tokens / seconds / 2 model-parallel devices per replica
    assert [r["tps"] for r in train] == pytest.approx([250.0, 250.0, 500.0, 250.0])
    assert [r["tflops"] for r in train] == pytest.approx([1.5, 1.5, 3.0, 1.5])  # 6e9 * tps / 1e12
    assert [r["mfu"] for r in train] == pytest.approx([50.0, 50.0, 100.0, 50.0])  # of the 3 TFLOPS peak
    assert [r["n_tokens_seen"] for r in train] == [1000, 3000, 7000, 7500]
    assert [r["time_s"] for r in train] == pytest.approx([2.0, 6.0, 10.0, 11.0])
    assert [r["step_time_s"] for r in train] == pytest.approx([2.0, 4.0, 2.0, 1.0])  # step 4 covers 2 steps
    assert [r["data_loading_pct"] for r in train] == pytest.approx([15.0, 10.0, 10.0, 5.0])
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024**3
    assert 0 < train[-1]["memory_gib"] <= rss_gib
    assert set(train[0]) >= {"step", "loss", "grad_norm", "lr", "tps", "tflops", "mfu", "memory_gib", "n_tokens_seen",
                             "time_s"}
    validation = records[-1]
    assert validation["split"] == "validation"
    assert (validation["step"], validation["loss"], validation["perplexity"]) == (4, 2.5, 12.18)
    assert (validation["n_tokens"], validation["time_s"]) == (4096, 0.5)


def test_explicit_token_count_extra_and_reset(tmp_path, clock):
    processor = _processor(_job_config(tmp_path), model_parallel=1)
    processor.reset_timers(500)  # resumed at step 500
    processor.ntokens_since_last_log = 300
    clock.now += 3.0
    record = processor.log(510, 1.0, 1.0, 0.1, lr=0.0, ntokens_seen=123_456, extra={"aux_loss": 0.25})
    processor.close()
    assert (record["n_tokens_seen"], record["aux_loss"], record["tps"]) == (123_456, 0.25, 100.0)
    assert record["step_time_s"] == pytest.approx(0.3)
    assert processor.ntokens_since_last_log == 0 and processor.data_loading_times == []
    assert _read_jsonl(tmp_path / "metrics.jsonl") == [record]


def test_console_line(tmp_path, clock, captured_logs):
    processor = _processor(_job_config(tmp_path))
    processor.ntokens_since_last_log = 1000
    clock.now += 2.0
    processor.log(1, 3.5, 4.0, 1.25, lr=1e-3)
    processor.close()
    line = captured_logs.records[-1].getMessage()
    assert line.startswith("step:  1  loss:  3.50000  grad_norm:  1.2500  memory: ")
    assert line.endswith("  tps: 250  tflops: 1.50  mfu: 50.00%")
    assert "GiB(" in line and "%)" in line and "\033[" not in line


class _Terminal:
    def isatty(self) -> bool:
        return True


def test_console_colors_and_missing_mfu(tmp_path, clock, captured_logs, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(metrics, "console_colors", lambda disabled: utils.console_colors(disabled, _Terminal()))
    processor = _processor(_job_config(tmp_path, disable_color_printing=False, cpu_peak_tflops=None))
    processor.ntokens_since_last_log = 10
    clock.now += 1.0
    record = processor.log(1, 3.5, 4.0, 1.25, lr=1e-3)
    processor.close()
    line = captured_logs.records[-1].getMessage()
    assert "\033[31mstep:  1" in line and line.endswith("mfu: n/a\033[39m")
    assert record["mfu"] is None
    assert _read_jsonl(tmp_path / "metrics.jsonl")[0]["mfu"] is None


@pytest.mark.parametrize(
    ("tty", "no_color", "disabled", "colored"),
    [
        (True, None, False, True),
        (False, None, False, False),  # a log file or a Slurm .out file
        (True, "1", False, False),
        (True, "", False, True),  # NO_COLOR counts only when non-empty
        (True, None, True, False),
    ],
)
def test_colors_only_on_a_terminal(monkeypatch, tty, no_color, disabled, colored):
    stream = _Terminal() if tty else io.StringIO()
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    assert (utils.console_colors(disabled, stream).red == "\033[31m") is colored


def test_default_stream_is_the_log_handlers(monkeypatch, tmp_path):
    """Without an explicit stream, colors follow the stream torchtitan's log handler writes to."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    handler = logging.StreamHandler(_Terminal())
    monkeypatch.setattr(torchtitan_logger, "handlers", [handler])
    assert utils.console_colors(False).red == "\033[31m"
    with open(tmp_path / "train.log", "w") as log_file:
        handler.setStream(log_file)
        assert utils.console_colors(False).red == ""
        processor = _processor(_job_config(tmp_path, disable_color_printing=False))
        processor.close()
        assert processor.color.red == ""


def test_should_log(tmp_path):
    processor = _processor(_job_config(tmp_path))
    processor.close()
    assert [s for s in range(1, 6) if processor.should_log(s)] == [1, 2, 4, 5]


def test_non_logging_rank_writes_nothing(tmp_path, clock):
    processor = _processor(_job_config(tmp_path, enable_tensorboard=True), rank_is_logging=False)
    _run_script(processor, clock)
    processor.close()
    assert list(tmp_path.iterdir()) == []


def test_save_for_all_ranks(tmp_path, clock, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    job_config = _job_config(tmp_path, enable_tensorboard=True, save_for_all_ranks=True)
    processor = _processor(job_config, rank_is_logging=False)
    _run_script(processor, clock)
    processor.close()
    assert [r["step"] for r in _read_jsonl(tmp_path / "metrics_rank3.jsonl")] == [1, 2, 4, 5, 4]
    assert not (tmp_path / "metrics.jsonl").exists()
    assert processor.tb_log_dir is None  # closed
    (timestamp_dir,) = (tmp_path / "tb").iterdir()
    assert [p.name for p in timestamp_dir.iterdir()] == ["rank_3"]


def test_tensorboard_scalars(tmp_path, clock):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    processor = _processor(_job_config(tmp_path, enable_tensorboard=True, save_tb_folder="tbx"))
    tb_dir = processor.tb_log_dir
    assert tb_dir.startswith(str(tmp_path / "tbx") + "/")
    _run_script(processor, clock)
    processor.close()

    events = EventAccumulator(tb_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected_tags = {
        "loss_metrics/global_avg_loss", "loss_metrics/global_max_loss", "grad_norm", "throughput(tps)", "tflops",
        "mfu(%)", "time_metrics/end_to_end(s)", "time_metrics/data_loading(s)", "time_metrics/data_loading(%)",
        "memory/max_active(GiB)", "memory/max_reserved(GiB)", "n_tokens_seen", "lr", "validation_metrics/loss",
        "validation_metrics/perplexity",
    }
    assert expected_tags <= tags

    def series(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert series("loss_metrics/global_avg_loss") == [(1, 10.0), (2, 5.0), (4, 2.5), (5, 2.0)]
    assert series("throughput(tps)") == [(1, 250.0), (2, 250.0), (4, 500.0), (5, 250.0)]
    assert series("mfu(%)") == [(1, 50.0), (2, 50.0), (4, 100.0), (5, 50.0)]
    assert series("n_tokens_seen") == [(1, 1000.0), (2, 3000.0), (4, 7000.0), (5, 7500.0)]
    assert [v for _, v in series("lr")] == pytest.approx([1e-3, 2e-3, 4e-3, 5e-3])
    assert series("validation_metrics/loss") == [(4, 2.5)]


def test_wandb_offline_run(tmp_path, clock, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "titan-tests")
    monkeypatch.setenv("WANDB_RUN_NAME", "metrics-unit-test")
    processor = _processor(_job_config(tmp_path, enable_wandb=True))
    run = processor._wandb.run
    assert (run.project, run.name, run.offline) == ("titan-tests", "metrics-unit-test", True)
    assert run.config["training"]["steps"] == 5
    _run_script(processor, clock)
    processor.close()

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb"))
    assert (tmp_path / "metrics.jsonl").exists()
