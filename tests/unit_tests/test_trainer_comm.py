"""The trainer's communication set-up: the switch to the training timeout after the first step this
process runs (also after a resume), and flight-recorder dumps under the job's dump folder."""

import os

import pytest

from torchtitan.config import ConfigManager
from torchtitan.distributed import utils as dist_utils
from torchtitan.train import Trainer

DEBUG_CONFIG = "torchtitan/models/llama3/train_configs/debug_model.toml"


def _train(dump_folder: str, steps: int) -> None:
    job_config = ConfigManager().parse_args([
        "--job.config_file", DEBUG_CONFIG, "--job.dump_folder", dump_folder,
        "--training.steps", str(steps), "--training.seq_len", "32", "--training.local_batch_size", "2",
        "--lr_scheduler.warmup_steps", "1", "--checkpoint.enable", "--checkpoint.interval", "2",
        "--checkpoint.no_last_save_model_only",
    ])
    trainer = Trainer(job_config)
    try:
        trainer.train()
    finally:
        trainer.close()


def test_train_timeout_switch_after_the_first_step_this_process_runs(tmp_path, monkeypatch):
    events: list[tuple[str, object]] = []
    real_init, real_step = dist_utils.init_distributed, Trainer.train_step

    def init(comm_config, dump_folder=""):
        events.append(("init", dump_folder))
        return real_init(comm_config, dump_folder)

    def step(self, microbatches):
        real_step(self, microbatches)
        events.append(("step", self.step))

    monkeypatch.setattr(dist_utils, "init_distributed", init)
    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(dist_utils, "set_pg_timeouts", lambda seconds, pd: events.append(("timeout", seconds)))
    _train(str(tmp_path), steps=2)
    assert events == [("init", str(tmp_path)), ("step", 1), ("timeout", 100), ("step", 2)]
    events.clear()
    _train(str(tmp_path), steps=4)  # resumes from the step-2 checkpoint
    assert events == [("init", str(tmp_path)), ("step", 3), ("timeout", 100), ("step", 4)]


class _Comm:
    trace_buf_size = 2000
    save_traces_folder = "comm_traces"


@pytest.fixture
def clean_fr_env(monkeypatch):
    for var in ("TORCH_FR_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DUMP_ON_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)


def test_flight_recorder_dumps_under_the_dump_folder_on_cuda(tmp_path, clean_fr_env):
    trace_dir = dist_utils.configure_flight_recorder(_Comm(), str(tmp_path), "cuda")
    assert trace_dir == str(tmp_path / "comm_traces") and os.path.isdir(trace_dir)
    assert os.environ["TORCH_FR_BUFFER_SIZE"] == "2000"
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "comm_traces" / "rank_")


def test_flight_recorder_is_said_to_need_nccl_on_cpu(tmp_path, clean_fr_env, captured_logs):
    assert dist_utils.configure_flight_recorder(_Comm(), str(tmp_path), "cpu") is None
    assert not (tmp_path / "comm_traces").exists() and "TORCH_FR_DUMP_TEMP_FILE" not in os.environ
    messages = [r.getMessage() for r in captured_logs.records]
    assert sum("flight recorder needs NCCL" in m for m in messages) == 1


def test_flight_recorder_off(tmp_path, clean_fr_env, captured_logs):
    off = _Comm()
    off.trace_buf_size = 0
    assert dist_utils.configure_flight_recorder(off, str(tmp_path), "cuda") is None
    assert not (tmp_path / "comm_traces").exists() and not captured_logs.records
