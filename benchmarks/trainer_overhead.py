"""Trainer overhead: our Trainer vs a bare PyTorch loop on the same model, data and batch.

    python benchmarks/trainer_overhead.py [--steps 30] [--warmup 5] [--rounds 3] [overrides ...]

Both sides train the debug Llama from the same initial weights on the same batches (taken from the
same dataloader), with the same optimizer, precision and gradient clipping, in this one process.
Rounds alternate ours/bare so machine drift hits both; the best round of each is reported.
"""

import argparse
import copy
import time

import torch

from torchtitan.config import ConfigManager
from torchtitan.train import Trainer

CONFIG = "torchtitan/models/llama3/train_configs/debug_model.toml"


def time_trainer(trainer: Trainer, steps: int) -> float:
    """Seconds for `steps` more steps of the real loop (data loading, metrics, clipping included)."""
    trainer.job_config.training.steps = trainer.step + steps
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def time_bare(model, optimizer, batches, autocast, max_norm: float) -> float:
    """Seconds for a minimal loop over pre-materialized `batches`: the floor the trainer is held to."""
    start = time.perf_counter()
    for inputs, labels in batches:
        optimizer.zero_grad()
        with autocast:
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), reduction="sum"
            ) / labels.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args, overrides = parser.parse_known_args()

    job_config = ConfigManager().parse_args(
        ["--job.config_file", CONFIG, "--metrics.log_freq", "10", "--job.dump_folder", "/tmp/tt_bench", *overrides]
    )
    trainer = Trainer(job_config)
    time_trainer(trainer, args.warmup)

    # The bare loop: an identical copy of the model and optimizer, fed the trainer's own batches.
    model = copy.deepcopy(trainer.model_parts[0])
    opt_cfg = job_config.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay, fused=opt_cfg.implementation == "fused",
    )
    builder = trainer.train_spec.build_dataloader_fn
    data_iter = iter(builder(1, 0, trainer.tokenizer, job_config))
    batches = []
    for _ in range(args.steps * trainer.grad_accum_steps):
        inputs, labels = next(data_iter)
        batches.append((inputs["input"].to(trainer.device), labels.to(trainer.device)))
    time_bare(model, optimizer, batches[: args.warmup], trainer.autocast, job_config.training.max_norm)

    tokens = args.steps * trainer.grad_accum_steps * batches[0][1].numel()
    ours, bare = [], []
    for _ in range(args.rounds):
        ours.append(tokens / time_trainer(trainer, args.steps))
        bare.append(tokens / time_bare(model, optimizer, batches, trainer.autocast, job_config.training.max_norm))
    trainer.close()
    best_ours, best_bare = max(ours), max(bare)
    print(f"rounds: ours {[round(x) for x in ours]} tok/s, bare {[round(x) for x in bare]} tok/s")
    print(f"trainer: {best_ours:.0f} tok/s  bare loop: {best_bare:.0f} tok/s  ratio: {best_ours / best_bare:.3f}")


if __name__ == "__main__":
    main()
