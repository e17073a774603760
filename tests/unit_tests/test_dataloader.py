"""ParallelAwareDataloader: layout-independent data order, exact resume (0 and 2 workers), exhaustion.

The order and resume tests run on the streaming path and on token files pretokenized from the same corpus,
always against the streaming path's batches: both must give the same windows bitwise."""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported
os.environ["HF_HUB_OFFLINE"] = "1"

import gzip
import json
from pathlib import Path

import pytest
import torch

from torchtitan.components.dataloader import (
    DataExhaustedError,
    ParallelAwareDataloader,
    build_text_dataloader,
    build_text_validation_dataloader,
)
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.config import ConfigError, JobConfig

CORPUS = Path(__file__).resolve().parents[1] / "assets/shakespeare"
SEQ_LEN = 16
GLOBAL_BATCH = 4
STEPS = 3


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(JobConfig())


@pytest.fixture(params=["documents", "tokens"])
def dataset_path(request) -> str | None:
    """Where the training data is read from: None streams the shipped corpus, else its token folder."""
    return str(request.getfixturevalue("shakespeare_tokens")) if request.param == "tokens" else None


def job_config(local_batch_size: int, num_workers: int = 0, seq_len: int = SEQ_LEN, **training) -> JobConfig:
    config = JobConfig()
    config.training.dataset = "shakespeare"
    config.training.seq_len = seq_len
    config.training.local_batch_size = local_batch_size
    config.training.dataloader.num_workers = num_workers
    for key, value in training.items():
        setattr(config.training, key, value)
    return config


def loaders(tokenizer, dp: int, num_workers: int = 0, **training) -> list[ParallelAwareDataloader]:
    config = job_config(GLOBAL_BATCH // dp, num_workers, **training)
    return [build_text_dataloader(dp, rank, tokenizer, config) for rank in range(dp)]


def global_batches(ranks: list, steps: int, microbatches: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step: the ranks' microbatches concatenated in (microbatch, rank) order."""
    iterators = [iter(loader) for loader in ranks]
    out = []
    for _ in range(steps):
        parts = [next(it) for _ in range(microbatches) for it in iterators]
        out.append((torch.cat([p[0]["input"] for p in parts]), torch.cat([p[1] for p in parts])))
    return out


def assert_same(got, expected):
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


@pytest.fixture(scope="module")
def reference(tokenizer):
    """Global batches of the first 2 * STEPS steps on one rank."""
    return global_batches(loaders(tokenizer, 1), 2 * STEPS)


def test_batches_are_shifted_windows(tokenizer, reference):
    inputs, labels = reference[0]
    assert inputs.shape == labels.shape == (GLOBAL_BATCH, SEQ_LEN) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    with gzip.open(CORPUS / "train-00000-of-00004.jsonl.gz", "rt") as f:
        stream = tokenizer.encode(json.loads(f.readline())["text"], bos=True, eos=True)
    assert inputs[0].tolist() == stream[:SEQ_LEN]
    # consecutive windows of SEQ_LEN + 1 tokens: the label of the window's last position is not an input
    windows = torch.cat([reference[0][0], reference[0][1][:, -1:]], dim=1).flatten().tolist()
    assert windows[: len(stream)] == stream[: len(windows)]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_union_of_ranks_equals_one_rank(tokenizer, reference, dp, dataset_path):
    assert_same(global_batches(loaders(tokenizer, dp, dataset_path=dataset_path), STEPS), reference[:STEPS])


def test_gradient_accumulation_sees_the_same_steps(tokenizer, reference, dataset_path):
    config = job_config(1, dataset_path=dataset_path)
    one_per_microbatch = [build_text_dataloader(1, 0, tokenizer, config)]
    assert_same(global_batches(one_per_microbatch, STEPS, microbatches=GLOBAL_BATCH), reference[:STEPS])
    two_ranks = [build_text_dataloader(2, r, tokenizer, config) for r in range(2)]
    # microbatch m of rank r holds window 2m + r of the step: (m0 r0, m0 r1, m1 r0, m1 r1) is the step in order
    assert_same(global_batches(two_ranks, STEPS, microbatches=2), reference[:STEPS])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_mid_stream(tokenizer, reference, num_workers, dataset_path):
    config = job_config(GLOBAL_BATCH, num_workers, dataset_path=dataset_path)
    first = build_text_dataloader(1, 0, tokenizer, config)
    assert first.state_dict()["global_window"] == 0
    it = iter(first)
    assert_same([(b[0]["input"], b[1]) for b in (next(it) for _ in range(STEPS))], reference[:STEPS])
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON types, as a checkpoint stores them
    assert state["global_window"] == STEPS * GLOBAL_BATCH
    assert_same([(b[0]["input"], b[1]) for b in (next(it) for _ in range(STEPS))], reference[STEPS:])
    resumed = build_text_dataloader(1, 0, tokenizer, config)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert_same(global_batches([resumed], STEPS), reference[STEPS:])
    other_workers = build_text_dataloader(
        1, 0, tokenizer, job_config(GLOBAL_BATCH, 2 - num_workers, dataset_path=dataset_path)
    )
    other_workers.load_state_dict(state)
    assert_same(global_batches([other_workers], STEPS), reference[STEPS:])
    # a new iter() on the same loader continues from where the previous one stopped
    assert_same(global_batches([first], 1), global_batches([resumed], 1))


def test_dp2_state_resumes_under_dp4_and_dp1(tokenizer, reference, dataset_path):
    dp2 = loaders(tokenizer, 2, dataset_path=dataset_path)
    assert_same(global_batches(dp2, 2), reference[:2])
    states = [loader.state_dict() for loader in dp2]
    assert states[0] == states[1] and states[0]["global_window"] == 2 * GLOBAL_BATCH
    for dp in (4, 1):
        resumed = loaders(tokenizer, dp, dataset_path=dataset_path)
        for loader in resumed:
            loader.load_state_dict(states[0])
        assert_same(global_batches(resumed, 2), reference[2:4])


def test_state_for_another_dataset_or_seq_len_is_rejected(tokenizer):
    state = build_text_dataloader(1, 0, tokenizer, job_config(2)).state_dict()
    other = build_text_dataloader(1, 0, tokenizer, job_config(2, seq_len=32))
    with pytest.raises(ConfigError, match=r"dataset 'shakespeare' with seq_len 16, but this job uses 'shakespeare' "
                                          r"with seq_len 32; .* checkpoint.exclude_from_loading"):
        other.load_state_dict(state)


def _tiny_corpus(tmp_path, tokenizer) -> tuple[str, int]:
    docs = ["Exit, pursued by a bear.", "The rest is silence.", "All the world's a stage."]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(tmp_path / "tiny.jsonl"), sum(len(tokenizer.encode(d)) + 2 for d in docs)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_finite_dataset_raises_data_exhausted(tmp_path, tokenizer, num_workers):
    path, n_tokens = _tiny_corpus(tmp_path, tokenizer)
    seq_len, dp = 4, 2
    config = job_config(1, num_workers, seq_len=seq_len, dataset="c4_test", dataset_path=path)
    full_chunks = n_tokens // (seq_len + 1) // dp
    for rank in range(dp):
        loader = build_text_dataloader(dp, rank, tokenizer, config, infinite=False)
        it = iter(loader)
        assert len([next(it) for _ in range(full_chunks)]) == full_chunks
        with pytest.raises(DataExhaustedError, match=r"dataset 'c4_test' is exhausted after \d+ windows of 5 tokens"):
            next(it)
        assert loader.state_dict()["global_window"] == full_chunks * dp
    infinite = iter(build_text_dataloader(dp, 0, tokenizer, config))
    assert len([next(infinite) for _ in range(3 * full_chunks)]) == 3 * full_chunks


def test_validation_dataloader_uses_validation_section(tokenizer):
    config = JobConfig()
    config.validation.dataset = "shakespeare_validation"
    config.validation.seq_len = 8
    config.validation.local_batch_size = 3
    loader = build_text_validation_dataloader(1, 0, tokenizer, config)
    inputs, labels = next(iter(loader))
    assert inputs["input"].shape == (3, 8)
    assert tokenizer.decode(inputs["input"][0].tolist()).startswith("<|begin_of_text|>Julius Caesar")
    assert loader.dataset.infinite is False


def test_default_c4_test_without_path_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match=r"training.dataset='c4_test' .* set training.dataset_path"):
        build_text_dataloader(1, 0, tokenizer, JobConfig())
