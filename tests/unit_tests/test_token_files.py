"""Token files: their content, windows at any index equal to the streaming path's, each rank reading only its
own windows, O(1) resume, per-pass shuffling, validation data, the one-line errors, and training end to end."""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported
os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.unit_tests.test_dataloader import assert_same, global_batches
from torchtitan.components.dataloader import (
    DataExhaustedError,
    build_text_dataloader,
    build_text_validation_dataloader,
)
from torchtitan.components.datasets.packing import StreamPosition
from torchtitan.components.datasets.pretokenize import pretokenize
from torchtitan.components.datasets.registry import DATASETS, DatasetSpec
from torchtitan.components.datasets.sources import load_documents
from torchtitan.components.datasets import token_files
from torchtitan.components.datasets.token_files import INDEX_NAME, TokenFiles
from torchtitan.components.datasets.window_order import shuffled_index
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.config import ConfigError, ConfigManager, JobConfig

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = JobConfig().model.hf_assets_path
DOCS = [
    "Exit, pursued by a bear.",
    "The rest is silence.",
    "All the world's a stage.",
    "",
    "Now is the winter of our discontent.",
    "Brevity is the soul of wit.",
    "We are such stuff as dreams are made on.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(JobConfig())


def job(dataset_path: str | Path | None, seq_len: int = 5, local_batch_size: int = 2, **training) -> JobConfig:
    config = JobConfig()
    config.training.dataset = "shakespeare" if dataset_path is None else "c4_test"
    config.training.dataset_path = None if dataset_path is None else str(dataset_path)
    config.training.seq_len = seq_len
    config.training.local_batch_size = local_batch_size
    for key, value in training.items():
        setattr(config.training, key, value)
    return config


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, Path]:
    """(a JSON-lines file of DOCS, its token folder with one shard per document, so windows cross shards)."""
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    pretokenize(load_documents("c4_test", str(path), "training"), TOKENIZER, tmp_path / "tokens", shard_tokens=1)
    return path, tmp_path / "tokens"


def flat_tokens(folder: Path) -> np.ndarray:
    index = json.loads((folder / INDEX_NAME).read_text())
    return np.concatenate([np.fromfile(folder / s["file"], dtype=index["dtype"]) for s in index["shards"]])


def batches(loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return global_batches([loader], count)


def one_line_error(call) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_token_files_hold_the_streaming_token_stream(shakespeare_tokens, tokenizer):
    docs = [text for _, text in load_documents("shakespeare", None, "training").documents(None)]
    expected = [t for text in docs for t in tokenizer.encode(text, bos=True, eos=True)]
    assert flat_tokens(shakespeare_tokens).tolist() == expected
    index = json.loads((shakespeare_tokens / INDEX_NAME).read_text())
    assert index["dtype"] == "uint16" and index["tokenizer"]["fingerprint"] == tokenizer.fingerprint
    assert (index["documents"], index["tokens"]) == (len(docs), len(expected))
    assert len(index["shards"]) > 1 and sum(s["documents"] for s in index["shards"]) == len(docs)
    for shard in index["shards"]:
        data = (shakespeare_tokens / shard["file"]).read_bytes()
        assert len(data) == 2 * shard["tokens"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
    files = sorted(p.name for p in shakespeare_tokens.iterdir())
    assert files == sorted([INDEX_NAME, *(s["file"] for s in index["shards"])])


def test_windows_equal_streaming_across_shards_and_passes(tiny, tokenizer, monkeypatch):
    path, folder = tiny
    assert len(json.loads((folder / INDEX_NAME).read_text())["shards"]) == len(DOCS)
    monkeypatch.setattr(token_files, "MAX_OPEN_SHARDS", 2)  # shards are mapped and unmapped as reads move on
    n_tokens = len(flat_tokens(folder))
    steps = 3 * n_tokens // (2 * 6) + 1  # three passes over the data, windows running across pass boundaries
    streaming = build_text_dataloader(1, 0, tokenizer, job(path))
    tokens = build_text_dataloader(1, 0, tokenizer, job(folder))
    assert_same(batches(tokens, steps), batches(streaming, steps))
    assert len(tokens.dataset.tokens._maps) == 2
    for source in (path, folder):
        finite = iter(build_text_dataloader(1, 0, tokenizer, job(source), infinite=False))
        assert len([next(finite) for _ in range(n_tokens // 6 // 2)]) == n_tokens // 6 // 2
        with pytest.raises(DataExhaustedError, match=r"exhausted after \d+ windows of 6 tokens"):
            next(finite)


def test_each_rank_reads_only_its_own_windows(shakespeare_tokens, tokenizer, monkeypatch):
    reads = []
    original = TokenFiles.read_into
    def recording(tokens: TokenFiles, out: np.ndarray, start: int) -> None:
        reads.append(start)
        original(tokens, out, start)

    monkeypatch.setattr(TokenFiles, "read_into", recording)
    seq_len, local, dp, rank = 64, 2, 64, 5
    it = iter(build_text_dataloader(dp, rank, tokenizer, job(shakespeare_tokens, seq_len, local)))
    for _ in range(3):
        next(it)
    chunk = local * dp
    expected = [(c * chunk + rank * local + i) * (seq_len + 1) for c in range(3) for i in range(local)]
    assert reads == expected


def test_resume_far_into_the_stream_is_immediate(shakespeare_tokens, tokenizer):
    tokens = flat_tokens(shakespeare_tokens).astype(np.int64)
    seq_len, window = 64, 10**9  # ~42,000 passes over the corpus
    loader = build_text_dataloader(1, 0, tokenizer, job(shakespeare_tokens, seq_len, 1))
    position = StreamPosition(window).to_dict()
    stream = {"dataset": "c4_test", "seq_len": seq_len, "position": position, "format": "tokens"}
    loader.load_state_dict({"global_window": window, "stream": json.dumps(stream)})
    inputs, labels = next(iter(loader))
    start = window * (seq_len + 1) % len(tokens)
    expected = np.take(tokens, range(start, start + seq_len + 1), mode="wrap")
    assert inputs["input"][0].tolist() == expected[:-1].tolist() and labels[0].tolist() == expected[1:].tolist()
    assert loader.state_dict()["global_window"] == window + 1


def test_shuffled_index_is_a_permutation_per_seed_and_pass():
    for count in [1, 2, 3, 7, 16, 100, 1000]:
        assert sorted(shuffled_index(i, count, 5, 0) for i in range(count)) == list(range(count))
    orders = {(seed, epoch): [shuffled_index(i, 1000, seed, epoch) for i in range(1000)]
              for seed in (0, 1) for epoch in (0, 1)}
    assert len({tuple(order) for order in orders.values()}) == 4
    assert orders[0, 0] == [shuffled_index(i, 1000, 0, 0) for i in range(1000)]  # deterministic
    with pytest.raises(ValueError):
        shuffled_index(1000, 1000, 0, 0)


def test_shuffle_permutes_the_windows_of_each_pass(shakespeare_tokens, tokenizer):
    seq_len = 4095
    per_pass = len(flat_tokens(shakespeare_tokens)) // (seq_len + 1)
    plain = batches(build_text_dataloader(1, 0, tokenizer, job(shakespeare_tokens, seq_len, 1)), per_pass)
    config = job(shakespeare_tokens, seq_len, 1, shuffle_seed=7)
    shuffled = batches(build_text_dataloader(1, 0, tokenizer, config), 2 * per_pass)
    rows = [tuple(x[0].tolist()) for x, _ in shuffled]
    first, second = rows[:per_pass], rows[per_pass:]
    assert sorted(first) == sorted(second) == sorted(tuple(x[0].tolist()) for x, _ in plain)
    assert first != second and first != [tuple(x[0].tolist()) for x, _ in plain]


@pytest.mark.parametrize("dp", [2, 4])
def test_shuffle_is_layout_independent_and_resumes_across_layouts(shakespeare_tokens, tokenizer, dp):
    def loaders(dp: int) -> list:
        config = job(shakespeare_tokens, 16, 4 // dp, shuffle_seed=3)
        return [build_text_dataloader(dp, rank, tokenizer, config) for rank in range(dp)]

    reference = global_batches(loaders(1), 4)
    ranks = loaders(dp)
    assert_same(global_batches(ranks, 2), reference[:2])
    state = ranks[0].state_dict()
    assert all(loader.state_dict() == state for loader in ranks)
    for other in (1, 4 if dp == 2 else 2):
        resumed = loaders(other)
        for loader in resumed:
            loader.load_state_dict(state)
        assert_same(global_batches(resumed, 2), reference[2:])


def test_resume_across_formats(tiny, tokenizer):
    path, folder = tiny
    streaming = build_text_dataloader(1, 0, tokenizer, job(path))
    tokens = build_text_dataloader(1, 0, tokenizer, job(folder))
    batches(streaming, 3)
    tokens.load_state_dict(streaming.state_dict())  # the same windows: token files continue a streaming run
    assert_same(batches(tokens, 3), batches(streaming, 3))
    fresh_streaming = build_text_dataloader(1, 0, tokenizer, job(path))
    message = one_line_error(lambda: fresh_streaming.load_state_dict(tokens.state_dict()))
    assert "a window index into token files, which the streaming path cannot resume" in message
    shuffled = build_text_dataloader(1, 0, tokenizer, job(folder, shuffle_seed=1))
    message = one_line_error(lambda: shuffled.load_state_dict(tokens.state_dict()))
    assert "this job uses 'c4_test' with seq_len 5 and shuffle_seed 1; restore those settings" in message


def test_validation_reads_token_files(shakespeare_tokens, tokenizer):
    config = JobConfig()
    config.validation.dataset_path = str(shakespeare_tokens)
    config.validation.seq_len, config.validation.local_batch_size = 8, 3
    loader = build_text_validation_dataloader(1, 0, tokenizer, config)
    inputs, _ = next(iter(loader))
    assert type(loader.dataset).__name__ == "TokenFileDataset" and loader.dataset.infinite is False
    assert inputs["input"][0].tolist() == flat_tokens(shakespeare_tokens)[:8].tolist()


def test_registered_name_pointing_at_a_token_folder(shakespeare_tokens, tokenizer, monkeypatch):
    monkeypatch.setitem(DATASETS, "shakespeare_tokens", DatasetSpec(str(shakespeare_tokens)))
    config = job(None, 16, 4)
    config.training.dataset = "shakespeare_tokens"
    streaming = build_text_dataloader(1, 0, tokenizer, job(None, 16, 4))
    assert_same(batches(build_text_dataloader(1, 0, tokenizer, config), 2), batches(streaming, 2))


def test_shuffle_seed_on_the_streaming_path_is_refused(tokenizer):
    message = one_line_error(lambda: build_text_dataloader(1, 0, tokenizer, job(None, shuffle_seed=3)))
    assert message.startswith("training.shuffle_seed=3 needs pretokenized token files, but training.dataset="
                              "'shakespeare' is read as documents")
    message = one_line_error(lambda: ConfigManager().parse_args(["--training.shuffle_seed", "-1"]))
    assert "training.shuffle_seed" in message


def test_shuffling_less_than_one_window_is_refused(tiny, tokenizer):
    message = one_line_error(lambda: build_text_dataloader(1, 0, tokenizer, job(tiny[1], 1000, shuffle_seed=1)))
    assert message.startswith("training.shuffle_seed: dataset 'c4_test' holds ")
    assert "less than one window of seq_len + 1 = 1001, so there is nothing to shuffle" in message


def _word_level_tokenizer(folder: Path, size: int) -> Path:
    folder.mkdir()
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("size, expected", [
    (70_000, "stores uint16 tokens, but the tokenizer in model.hf_assets_path='{tok}' has 70000 ids, more than "
             "uint16 holds; point model.hf_assets_path at the tokenizer the files were made with, or pretokenize "
             "again (scripts/data/pretokenize.py --hf_assets_path {tok}, which picks uint32)"),
    (300, "was tokenized with another tokenizer (tiktoken-sha256:84169ce3"),
])
def test_another_tokenizer_is_refused(shakespeare_tokens, tmp_path, size, expected):
    tok = str(_word_level_tokenizer(tmp_path / "tok", size))
    config = job(shakespeare_tokens)
    config.model.hf_assets_path = tok
    message = one_line_error(lambda: build_text_dataloader(1, 0, build_tokenizer(config), config))
    assert message.startswith(f"training.dataset_path='{shakespeare_tokens}': {shakespeare_tokens} ")
    assert expected.format(tok=tok) in message


@pytest.mark.parametrize("damage", ["truncated", "missing", "foreign index"])
def test_damaged_token_folder_is_refused(shakespeare_tokens, tmp_path, tokenizer, damage):
    folder = tmp_path / "tokens"
    shutil.copytree(shakespeare_tokens, folder)
    shard = folder / "shard-00001.bin"
    if damage == "foreign index":
        (folder / INDEX_NAME).write_text('{"format": "megatron"}')
        expected = f"{folder / INDEX_NAME} is not a version-1 torchtitan-token-files index; delete {folder} and run"
    elif damage == "missing":
        shard.unlink()
        expected = f"shard {shard} listed in {INDEX_NAME} is missing; delete {folder} and run scripts/data/"
    else:
        shard.write_bytes(shard.read_bytes()[:-3])
        expected = f"shard {shard} has {shard.stat().st_size} bytes but {INDEX_NAME} says {shard.stat().st_size + 3}"
    message = one_line_error(lambda: build_text_dataloader(1, 0, tokenizer, job(folder)))
    assert message.startswith(f"training.dataset_path='{folder}': {expected}")


def _train(tmp_path: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torchtitan.train",
        "--job.config_file", "torchtitan/models/llama3/train_configs/debug_model.toml",
        "--job.dump_folder", str(tmp_path / name),
        "--training.steps", "3", "--training.seq_len", "64", "--training.local_batch_size", "4",
        "--lr_scheduler.warmup_steps", "1", "--metrics.log_freq", "1", "--debug.seed", "7", "--debug.deterministic",
        *overrides,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_training_from_token_files_gives_the_streaming_losses(shakespeare_tokens, tmp_path):
    runs = {"documents": _train(tmp_path, "documents"),
            "tokens": _train(tmp_path, "tokens", "--training.dataset_path", str(shakespeare_tokens))}
    losses = {}
    for name, run in runs.items():
        assert run.returncode == 0, run.stderr[-3000:]
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if "split" not in r]
    assert len(losses["tokens"]) == 3 and losses["tokens"] == losses["documents"]  # bitwise
