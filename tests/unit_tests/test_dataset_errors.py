"""A corrupt local data file is a one-line ConfigError naming the config key, the file and, where known, the line."""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported
os.environ["HF_HUB_OFFLINE"] = "1"

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from torchtitan.components.dataloader import build_text_dataloader, build_text_validation_dataloader
from torchtitan.components.datasets.sources import load_documents
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.config import ConfigError, JobConfig

REPO = Path(__file__).resolve().parents[2]
RECORDS = "".join(json.dumps({"text": f"Document number {i}."}) + "\n" for i in range(100))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(JobConfig())


def syntax_error_on_line_57(path: Path) -> Path:
    lines = RECORDS.splitlines()
    lines[56] = '{"text": "an unterminated string}'
    path.write_text("\n".join(lines) + "\n")
    return path


def read_error(path: Path, section: str = "training") -> str:
    """The message of the ConfigError raised loading and reading all of `path`, checked to be one line."""
    with pytest.raises(ConfigError) as info:
        for _ in load_documents("c4_test", str(path), section).documents(None):
            pass
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{section}.dataset_path='{path}': ")
    return message


def test_binary_bytes_in_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(bytes(range(256)) * 8)
    assert f"{path}:1: invalid JSON" in read_error(path)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    compressed = gzip.compress(RECORDS.encode())
    path.write_bytes(compressed[: len(compressed) // 2])
    assert f"{path}: truncated or corrupt gzip file" in read_error(path)


def test_json_syntax_error_names_the_line(tmp_path):
    path = syntax_error_on_line_57(tmp_path / "data.jsonl")
    assert f"{path}:57: invalid JSON" in read_error(path)


def test_bad_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text(RECORDS)
    bad = syntax_error_on_line_57(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text(RECORDS)
    assert f"{bad}:57: invalid JSON" in read_error(tmp_path)


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"text": ["First.", "Second."]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["Third."]}), tmp_path / "b.parquet")
    assert f"{tmp_path / 'b.parquet'} has no 'text' column (columns: ['body'])" in read_error(tmp_path)


def test_validation_dataset_path(tmp_path, tokenizer):
    path = syntax_error_on_line_57(tmp_path / "data.jsonl")
    assert f"{path}:57: invalid JSON" in read_error(path, "validation")
    config = JobConfig()
    config.validation.dataset = "c4_test"
    config.validation.dataset_path = str(path)
    with pytest.raises(ConfigError) as info:
        next(iter(build_text_validation_dataloader(1, 0, tokenizer, config)))
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"validation.dataset_path='{path}': {path}:57: invalid JSON")


def test_loader_workers_give_one_line(tmp_path, tokenizer):
    path = syntax_error_on_line_57(tmp_path / "data.jsonl")
    config = JobConfig()
    config.training.dataset = "c4_test"
    config.training.dataset_path = str(path)
    config.training.seq_len = 8
    config.training.dataloader.num_workers = 2
    with pytest.raises(ConfigError) as info:
        next(iter(build_text_dataloader(1, 0, tokenizer, config)))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"training.dataset_path='{path}': {path}:57: invalid JSON")


def test_train_exits_with_code_2(tmp_path):
    path = syntax_error_on_line_57(tmp_path / "data.jsonl")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torchtitan.train",
        "--job.config_file", "torchtitan/models/llama3/train_configs/debug_model.toml",
        "--training.dataset_path", str(path),
        "--training.steps", "1",
        "--job.dump_folder", str(tmp_path / "out"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: training.dataset_path='{path}': {path}:57: invalid JSON")
