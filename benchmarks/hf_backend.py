"""The transformers modeling backend vs our native Llama 3: same sizes, same weights, fwd + bwd + AdamW.

    PYTHONPATH=. python benchmarks/hf_backend.py [--sizes debug,100M] [--modes eager-fp32,compiled-fp32,...]
        [--steps 5] [--warmup 2] [--rounds 5] [--batch 8] [--seq-len 128]

The backend model (HFTransformerModel over transformers' LlamaForCausalLM modules) is built the way the
trainer builds it (meta, `init_weights`) from the config of a LlamaForCausalLM holding our weights, which
it then loads. Both run in this one process in alternating rounds (see benchmarks/vs_transformers.py);
prints tokens/s of each and the ratio backend / ours.
"""

import argparse
import tempfile

import torch

from benchmarks.vs_transformers import SIZES, build_pair, make_step, measure, parse_cli
from torchtitan.config import JobConfig
from torchtitan.experiments.transformers_modeling_backend.model.args import HFTransformerModelArgs
from torchtitan.experiments.transformers_modeling_backend.model.model import HFTransformerModel


def build_backend(theirs: torch.nn.Module, seq_len: int) -> torch.nn.Module:
    """An HFTransformerModel with the weights of the transformers model `theirs`."""
    with tempfile.TemporaryDirectory() as folder:
        theirs.config.architectures = ["LlamaForCausalLM"]
        theirs.config.save_pretrained(folder)
        job = JobConfig()
        job.hf_transformers.model, job.training.seq_len = folder, seq_len
        args = HFTransformerModelArgs().update_from_config(job)
    with torch.device("meta"):
        backend = HFTransformerModel(args)
    backend.to_empty(device="cpu")
    backend.init_weights()
    backend.load_state_dict(theirs.state_dict())
    return backend.train()


def compare(size: str, mode: str, cli: argparse.Namespace) -> None:
    torch.manual_seed(0)
    ours, theirs = build_pair(SIZES[size])
    backend = build_backend(theirs, cli.seq_len)
    del theirs
    compiled, bf16 = mode.startswith("compiled"), mode.endswith("bf16")
    steps = {"ours": make_step(ours, False, compiled, bf16), "backend": make_step(backend, False, compiled, bf16)}
    tokens = torch.randint(0, SIZES[size].vocab_size, (cli.batch, cli.seq_len))
    rounds, med, best = measure(steps, tokens, cli)
    nparams = sum(p.numel() for p in ours.parameters())
    print(
        f"{size} ({nparams / 1e6:.1f}M) {mode}: ours {med['ours']:.0f} tok/s (best {best['ours']:.0f}), "
        f"backend {med['backend']:.0f} (best {best['backend']:.0f}); ratio backend/ours median "
        f"{med['backend'] / med['ours']:.3f}, best {best['backend'] / best['ours']:.3f}",
        flush=True,
    )


def main() -> None:
    cli = parse_cli(__doc__.splitlines()[0], sizes="debug", modes="eager-fp32,compiled-fp32")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {cli.batch} x {cli.seq_len}", flush=True)
    for size in cli.sizes.split(","):
        for mode in cli.modes.split(","):
            compare(size, mode, cli)


if __name__ == "__main__":
    main()
