"""Our Llama vs transformers' LlamaForCausalLM: same sizes, same weights, fwd + bwd + AdamW.

    PYTHONPATH=. python benchmarks/vs_transformers.py [--sizes debug,100M] [--modes eager-fp32,...]
        [--steps 5] [--warmup 2] [--rounds 5] [--batch 8] [--seq-len 128] [--breakdown]

The transformers model is built from our adapter's `hf_config()` and loaded with `to_hf` of our
weights, so both compute the same function. Per size and mode, both run in this one process: after
`--warmup` steps each, `--rounds` rounds alternate `--steps` steps of ours with `--steps` of theirs,
so machine drift hits both. Prints tokens/s (median and best round) of each and the ratio ours/theirs.

`--breakdown` then profiles `--steps` more steps of each (torch.profiler) and prints the time each spends
in the work both sides must do alike: the matmuls (same shapes, same FLOPs), the attention kernels, the
loss and the optimizer. However fast the rest of our step became, ours/theirs could not exceed
"ceiling" = theirs' step time / our time in that shared work.
"""

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.profiler
import transformers

from torchtitan.models.llama3 import Llama3StateDictAdapter, Transformer, TransformerModelArgs

VOCAB = 2560  # the shipped tokenizer's, as the debug job uses
SIZES = {
    # the debug flavor (~6.4M parameters)
    "debug": TransformerModelArgs(dim=256, n_layers=6, n_heads=16, rope_theta=500000, vocab_size=VOCAB),
    # ~101M parameters, grouped-query attention as in Llama 3
    "100M": TransformerModelArgs(
        dim=768, n_layers=12, n_heads=12, n_kv_heads=4, rope_theta=500000, vocab_size=16384
    ),
}
MODES = ["eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16"]
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm"}
# work both models must do on the same shapes (bf16 mode: our attention kernels run in fp32)
SHARED = MATMULS | {
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward", "aten::nll_loss_backward",
    "aten::_fused_adamw_",
}


def build_pair(args: TransformerModelArgs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our model with fresh weights and a transformers model holding the same weights."""
    with torch.device("meta"):
        ours = Transformer(args)
    ours.to_empty(device="cpu")
    with torch.no_grad():
        ours.init_weights()
    adapter = Llama3StateDictAdapter(args, None)
    config = transformers.LlamaConfig(**adapter.hf_config(), attn_implementation="sdpa")
    theirs = transformers.LlamaForCausalLM(config).float()
    theirs.load_state_dict(adapter.to_hf(ours.state_dict()), strict=True)
    return ours.train(), theirs.train()


def make_step(model: torch.nn.Module, hf: bool, compiled: bool, bf16: bool) -> Callable[[torch.Tensor], None]:
    """One training step (forward, token-mean cross entropy, backward, AdamW) on a batch of tokens."""
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(tokens: torch.Tensor) -> None:
        optimizer.zero_grad()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            logits = forward(input_ids=tokens).logits if hf else forward(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()

    return step


def run_steps(step: Callable[[torch.Tensor], None], tokens: torch.Tensor, steps: int) -> float:
    """Tokens/s over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        step(tokens)
    return steps * tokens.numel() / (time.perf_counter() - start)


def measure(
    steps: dict[str, Callable[[torch.Tensor], None]], tokens: torch.Tensor, cli: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, float]]:
    """Warm each step up, then alternate rounds of each; tokens/s per round, median and best per name."""
    for step in steps.values():
        run_steps(step, tokens, cli.warmup)
    rounds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(cli.rounds):
        for name, step in steps.items():
            rounds[name].append(run_steps(step, tokens, cli.steps))
    med = {name: statistics.median(r) for name, r in rounds.items()}
    best = {name: max(r) for name, r in rounds.items()}
    return rounds, med, best


def breakdown(step: Callable[[torch.Tensor], None], tokens: torch.Tensor, steps: int) -> dict[str, float]:
    """ms per step under the profiler: the whole step, its matmuls, and all its shared work (SHARED)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step(tokens)
        wall = time.perf_counter() - start
    self_ms = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    return {
        "step": wall * 1e3 / steps,
        "matmul": sum(self_ms.get(op, 0.0) for op in MATMULS),
        "shared": sum(self_ms.get(op, 0.0) for op in SHARED),
    }


def matmul_flops(model: torch.nn.Module, tokens: int) -> float:
    """FLOPs of one step's matmuls: forward and two backward products per Linear weight (attention excluded)."""
    return 6.0 * tokens * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def compare(size: str, mode: str, cli: argparse.Namespace) -> None:
    args = SIZES[size]
    torch.manual_seed(0)
    ours, theirs = build_pair(args)
    compiled, bf16 = mode.startswith("compiled"), mode.endswith("bf16")
    steps = {"ours": make_step(ours, False, compiled, bf16), "transformers": make_step(theirs, True, compiled, bf16)}
    tokens = torch.randint(0, args.vocab_size, (cli.batch, cli.seq_len))
    rounds, med, best = measure(steps, tokens, cli)
    nparams = sum(p.numel() for p in ours.parameters())
    print(
        f"{size} ({nparams / 1e6:.1f}M) {mode}: ours {med['ours']:.0f} tok/s (best {best['ours']:.0f}), "
        f"transformers {med['transformers']:.0f} (best {best['transformers']:.0f}); "
        f"ratio median {med['ours'] / med['transformers']:.3f}, best {best['ours'] / best['transformers']:.3f}; "
        f"rounds ours {[round(x) for x in rounds['ours']]}, transformers {[round(x) for x in rounds['transformers']]}",
        flush=True,
    )
    if cli.breakdown:
        ours_ms, theirs_ms = (breakdown(steps[name], tokens, cli.steps) for name in ("ours", "transformers"))
        gflops = matmul_flops(ours, tokens.numel()) / ours_ms["matmul"] / 1e6
        print(
            f"  breakdown, ms/step: ours {ours_ms['step']:.0f} (matmuls {ours_ms['matmul']:.0f}, {gflops:.0f} GFLOP/s; "
            f"shared work {ours_ms['shared']:.0f}), transformers {theirs_ms['step']:.0f} (matmuls "
            f"{theirs_ms['matmul']:.0f}; shared work {theirs_ms['shared']:.0f}); ceiling of the ratio "
            f"{theirs_ms['step'] / ours_ms['shared']:.2f}",
            flush=True,
        )


def peak_gflops() -> float:
    """This machine's fp32 matmul rate on a 2048^3 product, GFLOP/s: what the model's matmuls can reach."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def parse_cli(
    description: str, sizes: str = "debug,100M", modes: str = ",".join(MODES), breakdown: bool = False
) -> argparse.Namespace:
    """The command line shared by the benchmarks that compare two models step for step."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", default=sizes, help=f"comma-separated, of {list(SIZES)}")
    parser.add_argument("--modes", default=modes, help=f"comma-separated, of {MODES}")
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    if breakdown:
        parser.add_argument("--breakdown", action="store_true", help="profile each side's shared work, print the ceiling")
    return parser.parse_args()


def main() -> None:
    cli = parse_cli(__doc__.splitlines()[0], breakdown=True)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; batch {cli.batch} x "
        f"{cli.seq_len}; {cli.rounds} rounds of {cli.steps} steps after {cli.warmup} warm-up steps",
        flush=True,
    )
    if cli.breakdown:
        print(f"fp32 matmul peak of this machine (2048^3): {peak_gflops():.0f} GFLOP/s", flush=True)
    for size in cli.sizes.split(","):
        for mode in cli.modes.split(","):
            compare(size, mode, cli)


if __name__ == "__main__":
    main()
