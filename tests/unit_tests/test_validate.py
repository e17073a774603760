"""The Validator: eval mode, deterministic, RNG untouched, token-weighted loss; ranks whose shards differ in
length stop together; the validation dataset pads its last global chunk so every window counts once."""

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from torchtitan.components.datasets.packing import TextWindowDataset
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss
from torchtitan.components.metrics import build_metrics_processor
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.components.validate import Validator, build_validator_for
from torchtitan.config import ConfigError, JobConfig
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.protocols.train_spec import get_train_spec

VOCAB, SEQ, BATCH = 32, 8, 2


class ListLoader:
    """A validation dataloader over fixed batches, replayed from the start after `load_state_dict`."""

    def __init__(self, batches):
        self.batches = batches

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def __iter__(self):
        return iter(self.batches)


def batches(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        labels[0, :3] = IGNORE_INDEX
        out.append(({"input": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)}, labels))
    return out


def tiny_lm() -> nn.Module:
    torch.manual_seed(0)
    # Dropout makes a forward in train mode random: validation must run in eval mode.
    return nn.Sequential(nn.Embedding(VOCAB, 16), nn.Dropout(0.5), nn.Linear(16, VOCAB))


def make_validator(tmp, data, world_size: int = 1, steps: int = -1) -> Validator:
    job = JobConfig()
    job.job.dump_folder, job.validation.steps = str(tmp), steps
    pd = ParallelDims(dp_replicate=1, dp_shard=world_size, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=world_size)
    logging_rank = not dist.is_initialized() or dist.get_rank() == 0
    metrics = build_metrics_processor(job, pd, 0, torch.device("cpu"), logging_rank)
    return Validator(job, ListLoader(data), pd, cross_entropy_loss, metrics, torch.device("cpu"))


def test_loss_is_token_weighted_deterministic_and_leaves_training_alone(tmp_path):
    model, data = tiny_lm(), batches(3, seed=1)
    validator = make_validator(tmp_path, data)
    rng = torch.get_rng_state()
    first = validator.validate([model], step=1)
    second = validator.validate([model], step=2)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    model.eval()
    with torch.no_grad():
        total = sum(float(cross_entropy_loss(model(x["input"]), y)) for x, y in data)
    tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in data)
    assert first["loss"] == second["loss"] == pytest.approx(total / tokens, rel=1e-6)
    assert first["n_tokens"] == tokens and first["perplexity"] == pytest.approx(torch.tensor(total / tokens).exp())

    limited = make_validator(tmp_path, data, steps=2).validate([model], step=3)
    assert limited["n_tokens"] == tokens * 2 // 3


def _uneven_worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    try:
        data = batches(3 if rank == 0 else 5, seed=rank)
        record = make_validator(tmp, data, world_size=2).validate([tiny_lm()], step=1)
        per_batch = int((data[0][1] != IGNORE_INDEX).sum())
        assert record["n_tokens"] == 2 * 3 * per_batch  # both ranks stopped after rank 0's 3 batches
    finally:
        dist.destroy_process_group()


def test_ranks_with_uneven_shards_stop_together(tmp_path):
    ctx = mp.spawn(_uneven_worker, args=(str(tmp_path),), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("validation hung with uneven shards")


class Docs:
    description = "test documents"

    def __init__(self, texts):
        self.texts = texts

    def documents(self, state):
        for text in self.texts:
            yield None, text


def test_validation_dataset_pads_its_last_chunk():
    tokenizer = build_tokenizer(JobConfig())
    docs = Docs(["To be, or not to be, that is the question. " * 9, "Whether 'tis nobler in the mind to suffer."])
    seq = 16

    def rows(dp: int, rank: int, local: int) -> list[list[int]]:
        ds = TextWindowDataset(docs, tokenizer, "t", seq, local, dp, rank, infinite=False, pad_last=True)
        out = []
        for inputs, labels in ds:
            assert inputs["input"].shape == labels.shape == (local, seq)
            out.append([r.tolist() for r, lab in zip(inputs["input"], labels) if (lab != IGNORE_INDEX).any()])
        return out

    every = [r for b in rows(1, 0, 1) for r in b]
    per_rank = [rows(2, r, 3) for r in range(2)]
    assert len(every) % 6 != 0  # the last global chunk of 6 windows is partial
    assert len(per_rank[0]) == len(per_rank[1])  # the same number of batches on every rank
    merged = [r for chunk in zip(*per_rank) for part in chunk for r in part]
    assert merged == every  # every complete window, once, in order


def test_validation_without_a_validator_builder_is_a_config_error(tmp_path):
    job = JobConfig()
    job.validation.enable = True
    spec = get_train_spec("llama3")
    bare = type(spec)(**{**spec.__dict__, "build_validator_fn": None})
    with pytest.raises(ConfigError, match="validation.enable=true.*build_validator_fn"):
        build_validator_for(bare, job, None, None, None, None, torch.device("cpu"))
    job.validation.enable = False
    assert build_validator_for(bare, job, None, None, None, None, torch.device("cpu")) is None
