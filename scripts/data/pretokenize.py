"""Tokenize a dataset once, ahead of training, into memory-mappable token files.

    python scripts/data/pretokenize.py --dataset shakespeare --out data/shakespeare_tokens
    python scripts/data/pretokenize.py --dataset c4 --hf_assets_path assets/hf/Llama-3.1-8B \
        --out /data/c4_llama3 --workers 16

Train from the output with `--training.dataset_path <out>` (the same windows as streaming the documents;
see docs/data.md). `--dataset`/`--dataset_path` mean what `training.dataset`/`training.dataset_path` mean.
Output is byte-identical for any `--workers`; rerunning after an interruption resumes.
"""

import argparse
import sys
from pathlib import Path

from torchtitan.components.datasets.pretokenize import DEFAULT_SHARD_TOKENS, pretokenize
from torchtitan.components.datasets.sources import load_documents
from torchtitan.config import ConfigError
from torchtitan.tools.logging import init_logger


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="c4_test", help="registered dataset name (default: c4_test, which "
                        "needs --dataset_path)")
    parser.add_argument("--dataset_path", help="local file or folder, or hub id, overriding the dataset's location")
    parser.add_argument("--hf_assets_path", default="./tests/assets/tokenizer",
                        help="tokenizer folder or file, as model.hf_assets_path (default: the shipped tokenizer)")
    parser.add_argument("--out", required=True, type=Path, help="token folder to create")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard file, at least (default: {DEFAULT_SHARD_TOKENS})")
    args = parser.parse_args(argv)
    init_logger()
    try:
        source = load_documents(args.dataset, args.dataset_path, "training")
        pretokenize(source, args.hf_assets_path, args.out, args.workers, args.shard_tokens)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
