"""The validation loop through run_train.sh (and `[memory_estimation] enable` logging its table at start-up):
it does not perturb training, its loss is the same under
FSDP 2, TP 2, DDP 2, CP 2 and PP 2 from one seed checkpoint, `steps = -1` evaluates every window of the split (its
last global chunk partial, so ranks' shards differ) without a hang, and it writes its metrics records."""

import gzip
import json
import math
import re
from pathlib import Path

import pytest

from tests.integration_tests.runner import TINY, Run, assert_losses_close, make_seed_checkpoint, run_train
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.config import ConfigManager

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 64  # TINY's
STEPS = 2
DOCS = 3  # the first scenes of the shipped validation split: ~25 windows of 65 tokens


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """A small held-out split: the first DOCS scenes of the shipped validation split, one file."""
    folder = tmp_path_factory.mktemp("val_split")
    with gzip.open(REPO / "tests/assets/shakespeare/validation-00000-of-00001.jsonl.gz", "rt") as f:
        lines = [next(f) for _ in range(DOCS)]
    (folder / "val.jsonl").write_text("".join(lines))
    return folder


def split_windows(split: Path) -> int:
    """Complete windows of seq_len + 1 tokens in the split (documents packed with BOS and EOS)."""
    tokenizer = build_tokenizer(ConfigManager().parse_args([]))
    docs = [json.loads(line)["text"] for line in (split / "val.jsonl").read_text().splitlines()]
    return sum(len(tokenizer.encode(d, bos=True, eos=True)) for d in docs) // (SEQ_LEN + 1)


@pytest.fixture(scope="module")
def common(tmp_path_factory, split) -> list[str]:
    seed = make_seed_checkpoint(tmp_path_factory.mktemp("seed"), *TINY)
    return [
        *TINY, "--training.steps", str(STEPS), "--training.global_batch_size", "4",
        "--checkpoint.enable", "--checkpoint.initial_load_path", str(seed), "--checkpoint.load_only",
    ]


def validation_flags(split: Path) -> list[str]:
    return [
        "--validation.enable", "--validation.dataset", "shakespeare_validation", "--validation.dataset_path",
        str(split), "--validation.seq_len", str(SEQ_LEN), "--validation.local_batch_size", "3",
        "--validation.freq", "1", "--validation.steps", "-1",
    ]


LAYOUTS = {
    "fsdp2": (2, ["--parallelism.data_parallel_shard_degree", "2", "--training.local_batch_size", "2"]),
    "tp2": (2, ["--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1"]),
    "ddp2": (2, ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree",
                 "1", "--training.local_batch_size", "2"]),
    "cp2": (2, ["--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1"]),
    # the schedule's eval: validation batches shaped like the training microbatches
    "pp2": (2, ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1",
                "--validation.local_batch_size", "4"]),
}


@pytest.fixture(scope="module")
def single(tmp_path_factory, common, split) -> Run:
    """One process with validation (and the memory estimate at start-up, which must not perturb anything)."""
    return run_train(tmp_path_factory.mktemp("single"), *common, *validation_flags(split), "--memory_estimation.enable")


def test_validation_does_not_perturb_training(tmp_path, common, single, split):
    plain = run_train(tmp_path, *common)
    assert single.losses() == plain.losses() and sorted(plain.losses()) == [1, 2]
    records = single.metrics("validation")
    assert [r["step"] for r in records] == [1, 2]
    windows = split_windows(split)
    for r in records:
        assert set(r) >= {"split", "step", "loss", "perplexity", "n_tokens", "time_s"}
        assert r["n_tokens"] == windows * SEQ_LEN  # every complete window, the last partial batch too
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert r["time_s"] > 0
    assert records[1]["loss"] < records[0]["loss"]  # it measures the model that trains
    lines = [line for line in single.stdout.splitlines() + single.stderr.splitlines() if "validate  step:" in line]
    assert len(lines) == 2 and f"tokens: {windows * SEQ_LEN:,}" in lines[0] and "perplexity:" in lines[0]
    log = single.stdout + single.stderr
    assert "memory estimate per rank at world size 1" in log and re.search(r"peak\s+\d+\.\d+\s+\d+\.\d+", log)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_validation_loss_matches_across_layouts(tmp_path, common, single, split, name):
    """Each layout (DP 2: the split's last global chunk leaves the ranks different numbers of real rows)
    evaluates the same windows: same token count, loss within 1e-4."""
    ngpu, overrides = LAYOUTS[name]
    run = run_train(tmp_path, *common, *validation_flags(split), *overrides, ngpu=ngpu, timeout=300)
    ref = {r["step"]: r["loss"] for r in single.metrics("validation")}
    got = {r["step"]: r["loss"] for r in run.metrics("validation")}
    assert_losses_close(got, ref, rtol=1e-4)
    assert {r["n_tokens"] for r in run.metrics("validation")} == {single.metrics("validation")[0]["n_tokens"]}
