"""Trainer overhead: our Trainer vs a bare PyTorch loop on the same model, data and batch.

    python benchmarks/trainer_overhead.py [--steps 30] [--warmup 5] [--rounds 3] [overrides ...]

Both sides train the debug Llama from the same initial weights on the same data stream (each reads its
own instance of the same dataloader, timed), with the same optimizer, precision and gradient
clipping, in this one process. Rounds alternate ours/bare so machine drift hits both; the best and
the median round of each are reported.
"""

import argparse
import copy
import functools
import statistics
import time
from collections.abc import Iterator

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


def time_bare(steps: int, model, optimizer, data_iter: Iterator, device, autocast, max_norm: float) -> float:
    """Seconds for `steps` steps of a minimal loop reading `data_iter`: the floor the trainer is held to."""
    start = time.perf_counter()
    for _ in range(steps):
        input_dict, labels = next(data_iter)
        inputs, labels = input_dict["input"].to(device), labels.to(device)
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

    # The bare loop: an identical copy of the model and optimizer, reading the same data stream.
    model = copy.deepcopy(trainer.model_parts[0])
    opt_cfg = job_config.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay, fused=opt_cfg.implementation == "fused",
    )
    assert trainer.grad_accum_steps == 1, "the bare loop takes one batch per step: leave global_batch_size at -1"
    data_iter = iter(trainer.train_spec.build_dataloader_fn(1, 0, trainer.tokenizer, job_config))
    run_bare = functools.partial(
        time_bare, model=model, optimizer=optimizer, data_iter=data_iter, device=trainer.device,
        autocast=trainer.autocast, max_norm=job_config.training.max_norm,
    )
    run_bare(args.warmup)

    tokens = args.steps * job_config.training.local_batch_size * job_config.training.seq_len
    ours, bare = [], []
    for _ in range(args.rounds):
        ours.append(tokens / time_trainer(trainer, args.steps))
        bare.append(tokens / run_bare(args.steps))
    trainer.close()
    print(f"threads {torch.get_num_threads()}; rounds: ours {[round(x) for x in ours]} tok/s, "
          f"bare {[round(x) for x in bare]} tok/s")
    for name, pick in (("best", max), ("median", statistics.median)):
        print(f"{name}: trainer {pick(ours):.0f} tok/s  bare loop {pick(bare):.0f} tok/s  "
              f"ratio {pick(ours) / pick(bare):.3f}")


if __name__ == "__main__":
    main()
