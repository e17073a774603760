"""Train the shipped byte-level BPE tokenizer and export it as tiktoken ranks (`tokenizer.model`).

Trains on the training split of `tests/assets/shakespeare/` with the `tokenizers` library, using the Llama 3
pre-tokenizer pattern, so that the result loads through the same code path as the real Llama 3 tokenizer
(`torchtitan.components.tokenizer.TikTokenizer`: base ranks + 256 Llama 3 special tokens). Ranks 0-255 are the
single bytes (rank = byte value); rank 256 + i is the token made by the i-th learned merge. The script checks
that every training and validation document round-trips and reports how often tiktoken's rank-based merging
reproduces the trained BPE's tokens exactly. Deterministic: rerunning gives the same file.

    python scripts/data/build_tokenizer.py [--vocab-size 2304] [--out tests/assets/tokenizer/tokenizer.model]
"""

import argparse
import base64
import gzip
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # small CPU footprint; before tokenizers starts its pool

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from torchtitan.components.tokenizer import LLAMA3_PAT_STR, TikTokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS = REPO_ROOT / "tests/assets/shakespeare"


def read_documents(pattern: str) -> list[str]:
    """The `text` of every JSON line in the corpus files matching `pattern`, in file order."""
    docs = []
    for path in sorted(CORPUS.glob(pattern)):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            docs.extend(json.loads(line)["text"] for line in f)
    return docs


def byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level alphabet: printable bytes map to themselves, the others to 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


def train_bpe(docs: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    return tokenizer


def tiktoken_ranks(tokenizer: Tokenizer) -> dict[bytes, int]:
    """Single bytes first (rank = byte value), then one rank per learned merge in merge order."""
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    decode = byte_decoder()
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(decode[c] for c in left + right)
        if token not in ranks:
            ranks[token] = len(ranks)
    return ranks


def verify(path: Path, tokenizer: Tokenizer, ranks: dict[bytes, int], docs: list[str]) -> str:
    """Round-trip every document through the shipped loader; compare its tokens with the trained BPE's."""
    loaded = TikTokenizer(path)
    assert loaded.vocab_size == len(ranks) + 256, (loaded.vocab_size, len(ranks))
    decode = byte_decoder()
    n_tokens = same = 0
    for doc in docs:
        ids = loaded.encode(doc)
        if loaded.decode(ids) != doc:
            raise SystemExit(f"round trip failed for document starting {doc[:60]!r}")
        hf_ids = [ranks[bytes(decode[c] for c in tok)] for tok in tokenizer.encode(doc).tokens]
        same += ids == hf_ids
        n_tokens += len(ids)
    chars = sum(map(len, docs))
    return (
        f"{len(docs)} documents round-trip; {n_tokens} tokens ({chars / n_tokens:.2f} chars/token); "
        f"{same}/{len(docs)} documents tokenized exactly as the trained BPE does"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=2304, help="base ranks: 256 bytes + merges")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/assets/tokenizer/tokenizer.model")
    args = parser.parse_args()

    train_docs = read_documents("train-*.jsonl.gz")
    if not train_docs:
        raise SystemExit(f"no training files in {CORPUS}; run scripts/data/build_shakespeare_corpus.py first")
    tokenizer = train_bpe(train_docs, args.vocab_size)
    ranks = tiktoken_ranks(tokenizer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())
    args.out.write_text("".join(lines))
    print(verify(args.out, tokenizer, ranks, train_docs + read_documents("validation-*.jsonl.gz")))
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"{args.out}: {len(ranks)} ranks + 256 special tokens, sha256 {digest}")


if __name__ == "__main__":
    main()
