"""One rank of the Accelerator parity/resume checks (launched by test_accelerate.py under torchrun).

Trains a tiny fp32 transformers LlamaForCausalLM (same seed everywhere) with gradient accumulation in an
Accelerate-style loop and writes, from rank 0, each optimizer step's loss (the mean over data-parallel
ranks of the microbatch losses) and gradient norm to --out as JSON.

    --steps N            optimizer steps to run from scratch
    --save DIR           save_state(DIR) after them
    --load DIR --more M  then load_state(DIR) and run M more steps (recorded under "resumed")
    --check_errors       also record the one-line errors of layouts prepare() refuses
    --cpu_offload        FSDP with CPU offload (memory.cpu_offload)
Then 3 steps each of our own llama3 Transformer and of tiny transformers Qwen3 (q/k norms) and Qwen2 (tied
embeddings) models (under "llama3", "qwen3", "qwen2"). --save also exports the HF model (DIR_hf).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from torchtitan.accelerate import Accelerator, TorchTitanPlugin
from torchtitan.config import ConfigError

VOCAB, SEQ, ACCUM, GLOBAL_BATCH = 128, 16, 2, 4


class Tokens(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(idx)
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}


def build(tp: int, cpu_offload: bool) -> tuple[Accelerator, nn.Module, object, object, object]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = world // tp
    plugin = TorchTitanPlugin(
        job_config={
            "training": {"batch_size": GLOBAL_BATCH // dp, "seq_len": SEQ},
            "parallelism": {"tensor_parallel": tp, "data_parallel": dp},
            "activation_checkpoint": {"mode": "full"},
            "memory": {"cpu_offload": cpu_offload},
            "debug": {"seed": 7},
        }
    )
    accelerator = Accelerator(torchtitan_plugin=plugin, mixed_precision="no", gradient_accumulation_steps=ACCUM)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in model.named_parameters() if "norm" not in n]},
         {"params": [p for n, p in model.named_parameters() if "norm" in n], "weight_decay": 0.0}],
        lr=3e-3, weight_decay=0.1,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    loader = DataLoader(Tokens(), batch_size=GLOBAL_BATCH // dp, shuffle=True)
    # any order: scheduler and dataloader first
    scheduler, loader, model, optimizer = accelerator.prepare(scheduler, loader, model, optimizer)
    return accelerator, model, optimizer, loader, scheduler


def train(accelerator: Accelerator, model, optimizer, loader, scheduler, steps: int) -> list[dict]:
    records, micro_losses = [], []
    dp_mesh = accelerator.parallel_dims.get_mesh("dp")
    data = iter(loader)
    while len(records) < steps:
        batch = next(data)
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            micro_losses.append(loss.detach())
            if accelerator.sync_gradients:
                norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            mean = torch.stack(micro_losses).mean()
            if dp_mesh is not None:
                dist.all_reduce(mean, group=dp_mesh.get_group())
                mean /= dp_mesh.size()
            records.append({"loss": mean.item(), "grad_norm": norm.item(), "lr": scheduler.get_last_lr()[0]})
            micro_losses = []
    return records


def plain_losses(tp: int, steps: int, family: str) -> list[float]:
    """A second Accelerator, plain loop, no accumulation, on our own llama3 Transformer (its parallelize_fn)
    or a tiny transformers `family` model (tests/hf_models.py: qwen3's q/k norms, qwen2's tied embeddings);
    without TP the data-parallel ranks replicate (DDP) instead of sharding."""
    from tests.hf_models import family_config
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    plugin = TorchTitanPlugin(job_config={
        "model": {"name": "llama3"},
        "training": {"batch_size": GLOBAL_BATCH // (world // tp), "seq_len": SEQ},
        "parallelism": {"tensor_parallel": tp, "data_parallel": 1, "data_parallel_replicate_degree": world // tp},
        "debug": {"seed": 7},
    })
    accelerator = Accelerator(torchtitan_plugin=plugin)
    torch.manual_seed(0)
    if family == "llama3":
        model = Transformer(TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                                                 max_seq_len=SEQ))
        model.init_weights()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(family_config(family), dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = DataLoader(Tokens(), batch_size=GLOBAL_BATCH // (world // tp))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    dp_mesh = accelerator.parallel_dims.get_mesh("dp")
    losses = []
    for _, batch in zip(range(steps), loader):
        out = model(batch["input_ids"])
        logits = getattr(out, "logits", out)[:, :-1]  # the whole sequence: SP shards it over TP ranks
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if dp_mesh is not None:
            dist.all_reduce(loss, group=dp_mesh.get_group())
            loss /= dp_mesh.size()
        losses.append(loss.item())
    return losses


PLAIN_FAMILIES = ("llama3", "qwen3", "qwen2")


def refused_layouts(accelerator: Accelerator, model: nn.Module) -> dict[str, str]:
    """Under TP: prepare() of a module that has no TP plan; a sequence length SP cannot shard."""
    errors = {}
    try:
        accelerator.prepare(nn.Sequential(nn.Linear(4, 4)))
    except ConfigError as e:
        errors["generic_module_tp"] = str(e)
    try:
        model(input_ids=torch.zeros(1, SEQ - 1, dtype=torch.long))
    except ConfigError as e:
        errors["odd_sequence_length"] = str(e)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save")
    parser.add_argument("--load")
    parser.add_argument("--more", type=int, default=0)
    parser.add_argument("--check_errors", action="store_true")
    parser.add_argument("--cpu_offload", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    accelerator, model, optimizer, loader, scheduler = build(args.tp, args.cpu_offload)
    result = {"steps": train(accelerator, model, optimizer, loader, scheduler, args.steps)}
    if args.save:
        accelerator.save_state(args.save)
        accelerator.save_model(model, args.save + "_hf")
    if args.load:
        accelerator.load_state(args.load)
        result["resumed"] = train(accelerator, model, optimizer, loader, scheduler, args.more)
    if args.check_errors:
        result["errors"] = refused_layouts(accelerator, model)
    for family in PLAIN_FAMILIES:
        result[family] = plain_losses(args.tp, 3, family)
    if accelerator.is_main_process:
        with open(args.out, "w") as f:
            json.dump(result, f)
    accelerator.end_training()


if __name__ == "__main__":
    main()
