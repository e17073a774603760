"""The Accelerate TorchTitan page's complete training example, on torchtitan's own Accelerator.

Only the two `accelerate` imports are changed; the model is the page's 12-layer LlamaForCausalLM scaled
down to a tiny size, randomly initialized, trained on synthetic token sequences (no network needed).

    python examples/accelerate_loop.py
    torchrun --nproc_per_node 2 examples/accelerate_loop.py                         # data_parallel 2
    torchrun --nproc_per_node 2 examples/accelerate_loop.py --tensor_parallel 2     # tensor_parallel 2
"""

import argparse
import os

import torch
import torch.nn as nn  # noqa: F401  (kept from the page)
from torchtitan.accelerate import Accelerator
from torchtitan.accelerate import TorchTitanPlugin
from torch.utils.data import DataLoader, Dataset


class SimpleDataset(Dataset):
    """Arithmetic token sequences (start + k*stride) over the first 32 token ids, seeded by index:
    reproducible and learnable, so the loss falls within a few steps (random tokens would not)."""

    def __init__(self, size=1000, seq_len=512, vocab_size=32000):
        self.size = size
        self.seq_len = seq_len
        self.vocab_size = vocab_size

    def __len__(self):
        return self.size

    def __getitem__(self, idx):
        g = torch.Generator().manual_seed(idx)
        start = int(torch.randint(0, 32, (1,), generator=g))
        stride = int(torch.randint(1, 4, (1,), generator=g))
        input_ids = (start + stride * torch.arange(self.seq_len)) % min(32, self.vocab_size)
        labels = torch.cat([input_ids[1:], torch.full((1,), -100, dtype=torch.long)])
        return {"input_ids": input_ids, "labels": labels}


def main(args):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # TorchTitan configuration (the page's, scaled down; the degrees come from the command line)
    torchtitan_config = {
        "training": {
            "batch_size": 2,
            "seq_len": 64,
            "gradient_accumulation_steps": 4,
            "max_steps": 1000
        },
        "model": {
            "name": "llama3",
            "vocab_size": 256,
            "embed_dim": 64,
            "num_layers": 12,
            "num_heads": 4
        },
        "parallelism": {
            "tensor_parallel": args.tensor_parallel,
            "pipeline_parallel": 1,
            "data_parallel": world_size // args.tensor_parallel
        },
        "debug": {"seed": 42}  # our schema's keys mix in (here: reproducible runs)
    }

    # Initialize TorchTitan plugin
    torchtitan_plugin = TorchTitanPlugin(
        job_config=torchtitan_config,
        model_name="llama3"
    )

    # Initialize Accelerator with TorchTitan
    accelerator = Accelerator(
        torchtitan_plugin=torchtitan_plugin,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=4
    )

    # Model, optimizer, and data
    from transformers import LlamaForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=12,
        num_attention_heads=4,
        max_position_embeddings=2048
    )

    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)

    dataset = SimpleDataset(size=1000, seq_len=64, vocab_size=256)
    dataloader = DataLoader(dataset, batch_size=2, shuffle=True)

    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)

    # Prepare everything with TorchTitan
    model, optimizer, dataloader, scheduler = accelerator.prepare(
        model, optimizer, dataloader, scheduler
    )

    # Training loop
    model.train()
    for step, batch in enumerate(dataloader):
        if step >= args.steps:  # Limit for example
            break

        with accelerator.accumulate(model):
            outputs = model(**batch)
            loss = outputs.loss

            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

        if step % 10 == 0:
            accelerator.print(f"Step {step}, Loss: {loss.item():.4f}")

    accelerator.print("Training completed!")
    accelerator.end_training()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensor_parallel", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100, help="microbatches to train (the page's 100)")
    parser.add_argument("--mixed_precision", default="bf16", help="bf16 (the page's) or no")
    main(parser.parse_args())
