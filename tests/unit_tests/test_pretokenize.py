"""Pretokenizing: byte-identical output for any number of workers, clean resume after an interruption, the
command line, and its one-line errors."""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported
os.environ["HF_HUB_OFFLINE"] = "1"

import subprocess
import sys
from pathlib import Path

import pytest

from torchtitan.components.datasets import pretokenize as writer
from torchtitan.components.datasets.pretokenize import PROGRESS_NAME, pretokenize
from torchtitan.components.datasets.sources import load_documents
from torchtitan.components.datasets.token_files import INDEX_NAME
from torchtitan.config import ConfigError, JobConfig

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = JobConfig().model.hf_assets_path
SHARD_TOKENS = 20_000  # the validation split (44 scenes, ~90K tokens) makes 4-5 shards


def validation_split():
    return load_documents("shakespeare_validation", None, "training")


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """The files of an uninterrupted one-worker run over the validation split."""
    out = tmp_path_factory.mktemp("reference") / "tokens"
    pretokenize(validation_split(), TOKENIZER, out, shard_tokens=SHARD_TOKENS)
    return contents(out)


def test_two_workers_write_the_same_bytes(tmp_path, reference):
    index = pretokenize(validation_split(), TOKENIZER, tmp_path / "tokens", workers=2, shard_tokens=SHARD_TOKENS,
                        docs_per_task=3)
    assert len(index["shards"]) >= 4 and index["documents"] == 44
    assert contents(tmp_path / "tokens") == reference
    assert not (tmp_path / "tokens.partial").exists()


@pytest.mark.slow
def test_command_line(tmp_path, reference):
    cmd = [sys.executable, "scripts/data/pretokenize.py", "--dataset", "shakespeare_validation",
           "--out", str(tmp_path / "tokens"), "--workers", "2", "--shard_tokens", str(SHARD_TOKENS)]
    run = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert contents(tmp_path / "tokens") == reference


def interrupt(monkeypatch, after_adds: int) -> None:
    """Make the writer stop (as on Ctrl-C) while adding document `after_adds`."""
    calls = []
    add = writer._ShardWriter.add

    def add_then_stop(self, tokens):
        calls.append(1)
        if len(calls) == after_adds:
            raise KeyboardInterrupt
        add(self, tokens)

    monkeypatch.setattr(writer._ShardWriter, "add", add_then_stop)


def test_interrupted_run_resumes_after_its_last_complete_shard(tmp_path, reference, monkeypatch, captured_logs):
    out = tmp_path / "tokens"
    with monkeypatch.context() as patch:
        interrupt(patch, after_adds=30)
        with pytest.raises(KeyboardInterrupt):
            pretokenize(validation_split(), TOKENIZER, out, shard_tokens=SHARD_TOKENS)
    partial = tmp_path / "tokens.partial"
    assert not out.exists()  # nothing that looks complete
    left = sorted(path.name for path in partial.iterdir())
    assert INDEX_NAME not in left and PROGRESS_NAME in left and any(name.endswith(".bin.tmp") for name in left)
    complete = [name for name in left if name.endswith(".bin")]
    assert len(complete) >= 2
    pretokenize(validation_split(), TOKENIZER, out, shard_tokens=SHARD_TOKENS)
    assert f"resuming {partial} after {len(complete)} complete shards" in captured_logs.text
    assert contents(out) == reference and not partial.exists()


@pytest.mark.parametrize("change", ["settings", "damaged shard"])
def test_rerun_starts_over_when_the_partial_output_cannot_be_trusted(tmp_path, reference, monkeypatch,
                                                                      captured_logs, change):
    out, partial = tmp_path / "tokens", tmp_path / "tokens.partial"
    with monkeypatch.context() as patch:
        interrupt(patch, after_adds=30)
        with pytest.raises(KeyboardInterrupt):
            pretokenize(validation_split(), TOKENIZER, out, shard_tokens=SHARD_TOKENS // 2 if change == "settings"
                        else SHARD_TOKENS)
    if change == "damaged shard":
        shard = partial / "shard-00000.bin"
        shard.write_bytes(bytes(reversed(shard.read_bytes())))
    pretokenize(validation_split(), TOKENIZER, out, shard_tokens=SHARD_TOKENS)
    expected = "written with other settings" if change == "settings" else "does not match its recorded size and sha256"
    assert f"{expected}; starting over" in captured_logs.text
    assert contents(out) == reference


def test_finished_output_is_kept(tmp_path, captured_logs):
    out = tmp_path / "tokens"
    index = pretokenize(validation_split(), TOKENIZER, out, shard_tokens=SHARD_TOKENS)
    assert pretokenize(validation_split(), TOKENIZER, out, shard_tokens=SHARD_TOKENS) == index
    assert f"{out} is already complete ({index['tokens']} tokens); nothing to do" in captured_logs.text
    expected = f"--out {out} already exists and is not this command's finished output; remove it or choose another"
    with pytest.raises(ConfigError) as info:
        pretokenize(validation_split(), TOKENIZER, out, shard_tokens=SHARD_TOKENS // 2)
    assert str(info.value) == expected + " --out"
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match=r"^--out .*other already exists and is not this command's finished output"):
        pretokenize(validation_split(), TOKENIZER, tmp_path / "other")


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match=r"^--workers=0 and --shard_tokens=5 must be positive$"):
        pretokenize(validation_split(), TOKENIZER, tmp_path / "tokens", workers=0, shard_tokens=5)
