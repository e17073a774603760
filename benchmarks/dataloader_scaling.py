"""Dataloader scaling: tokens/s delivered to one data-parallel rank, streaming vs token files, as D grows.

    python benchmarks/dataloader_scaling.py [--degrees 1,8,64,512] [--seq-len 512] [--local-batch 4] \
        [--seconds 3] [--tokens DIR]

One process plays the last rank (D - 1) of data-parallel degree D, reading the shipped corpus through the
real `build_text_dataloader` (no loader workers): once streaming the documents (every rank tokenizes the
whole stream and keeps 1/D of it), once from token files pretokenized first into `--tokens` (a temporary
folder by default; the pretokenizing is timed too), and once from the token files with
`training.shuffle_seed`. After one warm-up batch, each loader is timed over batches for `--seconds` (at
least two batches). Tokens delivered = batches x local batch x seq len.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from torchtitan.components.dataloader import build_text_dataloader  # noqa: E402
from torchtitan.components.datasets.pretokenize import pretokenize  # noqa: E402
from torchtitan.components.datasets.sources import load_documents  # noqa: E402
from torchtitan.components.tokenizer import build_tokenizer  # noqa: E402
from torchtitan.config import JobConfig  # noqa: E402

PATHS = {"streaming": {}, "token files": {}, "token files, shuffled": {"shuffle_seed": 0}}


def tokens_per_second(config: JobConfig, dp: int, seconds: float) -> float:
    """Tokens/s that rank dp - 1 of `dp` receives from the dataloader `config` describes."""
    loader = build_text_dataloader(dp, dp - 1, build_tokenizer(config), config)
    batches = iter(loader)
    next(batches)
    count, start = 0, time.perf_counter()
    while count < 2 or time.perf_counter() - start < seconds:
        next(batches)
        count += 1
    elapsed = time.perf_counter() - start
    return count * config.training.local_batch_size * config.training.seq_len / elapsed


def job_config(seq_len: int, local_batch: int, dataset_path: str | None, shuffle_seed: int | None = None) -> JobConfig:
    config = JobConfig()
    config.training.dataset = "shakespeare"
    config.training.dataset_path = dataset_path
    config.training.seq_len = seq_len
    config.training.local_batch_size = local_batch
    config.training.shuffle_seed = shuffle_seed
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--degrees", default="1,8,64,512", help="data-parallel degrees, comma-separated")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--local-batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per loader and degree")
    parser.add_argument("--tokens", type=Path, help="token folder to reuse or create (default: a temporary one)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.tokens or Path(tmp) / "shakespeare"
        start = time.perf_counter()
        index = pretokenize(load_documents("shakespeare", None, "training"), JobConfig().model.hf_assets_path, folder)
        elapsed = time.perf_counter() - start
        size = sum((folder / shard["file"]).stat().st_size for shard in index["shards"])
        print(f"pretokenize: {index['tokens']:,} {index['dtype']} tokens of {index['documents']} documents in "
              f"{elapsed:.1f} s ({index['tokens'] / elapsed:,.0f} tokens/s, one worker), {size / index['tokens']:.0f} "
              "bytes per token on disk")

        print(f"\ntokens/s delivered to rank D-1 (seq len {args.seq_len}, local batch {args.local_batch}):")
        print("| D | " + " | ".join(PATHS) + " | token files / streaming |")
        print("| --- " * (len(PATHS) + 2) + "|")
        for dp in (int(d) for d in args.degrees.split(",")):
            rates = []
            for name, extra in PATHS.items():
                path = None if name == "streaming" else str(folder)
                config = job_config(args.seq_len, args.local_batch, path, **extra)
                rates.append(tokens_per_second(config, dp, args.seconds))
            cells = " | ".join(f"{rate:,.0f}" for rate in rates)
            print(f"| {dp} | {cells} | {rates[1] / rates[0]:.1f}x |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
