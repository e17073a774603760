"""Float8 training throughput (tensorwise, rowwise) against bf16 and fp32 training, in one process.

    python benchmarks/float8.py [--dim 1024] [--layers 2] [--seq-len 128] [--batch 4] [--steps 4]
                                [--warmup 2] [--rounds 3] [--compile] [--threads N]

A matmul-heavy Llama 3 (wide blocks, short sequences, a small vocabulary) trains on random tokens with
AdamW; every variant starts from the same weights. Variants:

- fp32: float32 everywhere;
- bf16: float32 weights, bfloat16 autocast (what the trainer does without FSDP);
- float8 tensorwise / rowwise: the block Linears converted by `quantize.linear.float8` (output filtered),
  their matmuls in float8 (`torch._scaled_mm` on CUDA; emulated on a CPU, where the converter always
  emulates), everything else in `--float8-base` precision
  (default: bfloat16 autocast on CUDA, as in torchtitan's float8 runs; float32 on CPU, where bf16 is slow).

After `--warmup` steps of each, `--rounds` rounds alternate `--steps` timed steps of every variant (so a
change of load hits all variants alike); tokens/s per round, the best and median, and ratios of the
medians against fp32 and bf16 are printed.
"""

import argparse
import contextlib
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import torchtitan.builtins  # noqa: F401  (registers the float8 converter)
from torchtitan.config import JobConfig
from torchtitan.distributed.compile import apply_compile
from torchtitan.models.llama3 import Transformer, TransformerModelArgs
from torchtitan.protocols.model_converter import build_model_converters

VOCAB = 2048


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="compile each block (torch.compile, inductor)")
    p.add_argument("--float8-base", choices=["float32", "bfloat16"], default=None,
                   help="precision of the non-float8 ops in the float8 variants")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    return p.parse_args()


def float8_model(base: Transformer, recipe: str) -> Transformer:
    """A copy of `base` converted the way `--model.converters quantize.linear.float8` converts it."""
    job = JobConfig()
    job.model.converters = ["quantize.linear.float8"]
    job.quantize.linear.float8.recipe_name = recipe
    job.quantize.linear.float8.filter_fqns = ["output"]
    model = copy.deepcopy(base)
    build_model_converters(job).convert(model)
    return model


def train_step_fn(model: Transformer, autocast: torch.dtype | None, device: torch.device, args) -> Callable:
    """One AdamW training step on fresh random tokens."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    context = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext

    def step() -> None:
        tokens = torch.randint(0, VOCAB, (args.batch, args.seq_len + 1), device=device)
        with context():
            logits = model(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step: Callable, n: int, device: torch.device) -> float:
    """Seconds for `n` steps (device work included)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - start


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    float8_base = args.float8_base or ("bfloat16" if device.type == "cuda" else "float32")
    f8_autocast = torch.bfloat16 if float8_base == "bfloat16" else None
    torch.manual_seed(0)
    model_args = TransformerModelArgs(
        dim=args.dim, n_layers=args.layers, n_heads=args.dim // 128, vocab_size=VOCAB, multiple_of=256,
        max_seq_len=args.seq_len,
    )
    with torch.device(device):
        base = Transformer(model_args)
        base.init_weights()
    variants = {
        "fp32": (base, None),
        "bf16": (copy.deepcopy(base), torch.bfloat16),
        "float8 tensorwise": (float8_model(base, "tensorwise"), f8_autocast),
        "float8 rowwise": (float8_model(base, "rowwise"), f8_autocast),
    }
    steps = {}
    for name, (model, autocast) in variants.items():
        if args.compile:
            apply_compile(model, argparse.Namespace(backend="inductor"))
        steps[name] = train_step_fn(model, autocast, device, args)

    if device.type == "cuda":
        device_name = f"{torch.cuda.get_device_name()} (SM {'.'.join(map(str, torch.cuda.get_device_capability()))})"
    else:
        device_name = f"CPU {platform.machine()} ({torch.backends.cpu.get_cpu_capability()})"
    print(f"device {device_name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
          f"load average {os.getloadavg()[0]:.2f}")
    nparams = sum(p.numel() for p in base.parameters())
    print(f"model: dim {args.dim}, {args.layers} layers, vocab {VOCAB}, {nparams / 1e6:.1f}M params; "
          f"{args.batch} x {args.seq_len} tokens/step; compile {args.compile}; float8 base {float8_base}")
    for name, step in steps.items():
        start = time.perf_counter()
        timed(step, args.warmup, device)
        print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)

    tokens = args.steps * args.batch * args.seq_len
    rounds: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            rounds[name].append(tokens / timed(step, args.steps, device))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in rounds.items()), flush=True)

    median = {name: statistics.median(v) for name, v in rounds.items()}
    print(f"\n{'variant':<18} {'tok/s rounds':<28} {'best':>8} {'median':>8} {'vs fp32':>8} {'vs bf16':>8}")
    for name, values in rounds.items():
        shown = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:<18} {shown:<28} {max(values):>8,.0f} {median[name]:>8,.0f} "
              f"{median[name] / median['fp32']:>8.2f} {median[name] / median['bf16']:>8.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
