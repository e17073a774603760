"""Tokenizers built from `model.hf_assets_path`: tiktoken ranks (`tokenizer.model`) or HF `tokenizer.json`.

`build_tokenizer` prefers `tokenizer.json` when a folder holds both (a Hugging Face Llama 3 download does;
its `original/tokenizer.model` is the same vocabulary), else `tokenizer.model`. The path may also name one
of the two files directly.
"""

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchtitan.components.datasets.paths import resolve_path
from torchtitan.config import ConfigError

# The Llama 3 pre-tokenizer pattern (also used when training the shipped tokenizer).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
# tiktoken can fail (stack overflow) or slow down badly on huge inputs and on very long runs of
# whitespace or non-whitespace characters, so inputs are cut into pieces first.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{MAX_RUN_CHARS + 1},}}|\S{{{MAX_RUN_CHARS + 1},}}")


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens Llama 3.1 appends after the base ranks, in id order."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_SPECIAL_TOKENS - len(named))]


class BaseTokenizer(ABC):
    """Text <-> token ids. `bos_id`/`eos_id`/`pad_id` are None when the vocabulary has no such token.

    `fingerprint` identifies the tokenizer by the content of the files defining it (not their location):
    token files written with one tokenizer are refused under another.
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    fingerprint: str

    @abstractmethod
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS prepended / EOS appended when asked (and defined)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """The text of `ids` (special tokens included as their text)."""

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids


def _encode_pieces(text: str) -> Iterator[str]:
    """Cut `text` into chunks of at most MAX_ENCODE_CHARS with no same-class run over MAX_RUN_CHARS."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        cuts = [
            k
            for run in _LONG_RUN.finditer(chunk)
            for k in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS)
        ]
        for begin, end in zip([0, *cuts], [*cuts, len(chunk)]):
            yield chunk[begin:end]


class TikTokenizer(BaseTokenizer):
    """A tiktoken ranks file (`tokenizer.model`) with the Llama 3 pattern and special tokens."""

    def __init__(self, path: str | Path):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = str(path)
        # tiktoken caches files by path; passing the content hash makes a rebuilt file at the same path win.
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        self.fingerprint = f"tiktoken-sha256:{digest}"
        try:
            ranks = load_tiktoken_bpe(path, expected_hash=digest)
        except ValueError as e:
            raise ConfigError(
                f"model.hf_assets_path: {path} is not a tiktoken ranks file (base64 token and rank per line): {e}"
            ) from None
        specials = llama3_special_tokens()
        self.special_tokens = {tok: len(ranks) + i for i, tok in enumerate(specials)}
        self._model = tiktoken.Encoding(
            name=Path(path).stem, pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = self._model.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode as plain text: special-token strings inside `text` are not turned into special ids."""
        ids: list[int] = []
        for piece in _encode_pieces(text):
            ids.extend(self._model.encode_ordinary(piece))
        return self._wrap(ids, bos, eos)

    def decode(self, ids: list[int]) -> str:
        return self._model.decode(list(ids))


def _config_token(config: dict[str, Any], key: str) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict with "content"."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class HuggingFaceTokenizer(BaseTokenizer):
    """A Hugging Face `tokenizer.json`; BOS/EOS/PAD come from `tokenizer_config.json` next to it."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            self._model = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust loader raises a bare Exception on malformed JSON
            raise ConfigError(f"model.hf_assets_path: {path} is not a valid tokenizer.json: {e}") from None
        config_file = path.parent / "tokenizer_config.json"
        config_bytes = config_file.read_bytes() if config_file.exists() else b""
        config = json.loads(config_bytes) if config_file.exists() else {}
        # BOS/EOS come from tokenizer_config.json, so it is part of the tokenizer's identity.
        digest = hashlib.sha256(path.read_bytes() + b"\0" + config_bytes).hexdigest()
        self.fingerprint = f"hf-sha256:{digest}"
        self.vocab_size = self._model.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._token_id(config, "bos_token", config_file)
        self.eos_id = self._token_id(config, "eos_token", config_file)
        self.pad_id = self._token_id(config, "pad_token", config_file)

    def _token_id(self, config: dict[str, Any], key: str, config_file: Path) -> int | None:
        token = _config_token(config, key)
        if token is None:
            return None
        token_id = self._model.token_to_id(token)
        if token_id is None:
            raise ConfigError(
                f"model.hf_assets_path: {config_file} sets {key}={token!r}, which is not in the tokenizer's "
                "vocabulary; fix the token or remove the entry"
            )
        return token_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode without the tokenizer's own post-processor; BOS/EOS are added here when asked."""
        return self._wrap(self._model.encode(text, add_special_tokens=False).ids, bos, eos)

    def decode(self, ids: list[int]) -> str:
        return self._model.decode(list(ids), skip_special_tokens=False)


def build_tokenizer(job_config: Any) -> BaseTokenizer:
    """The tokenizer in `model.hf_assets_path` (a folder, or a tokenizer.json / tokenizer.model file)."""
    return load_tokenizer(job_config.model.hf_assets_path)


def load_tokenizer(raw: str | None) -> BaseTokenizer:
    """The tokenizer at `raw` (a folder, or a tokenizer.json / tokenizer.model file), which errors call
    `model.hf_assets_path`."""
    path = resolve_path(raw) if raw else None
    if path is None:
        raise ConfigError(
            f"model.hf_assets_path={raw!r} does not exist; point it at a folder with tokenizer.json or "
            "tokenizer.model (the shipped one is ./tests/assets/tokenizer)"
        )
    if path.is_file():
        return HuggingFaceTokenizer(path) if path.suffix == ".json" else TikTokenizer(path)
    if (path / "tokenizer.json").is_file():
        return HuggingFaceTokenizer(path / "tokenizer.json")
    if (path / "tokenizer.model").is_file():
        return TikTokenizer(path / "tokenizer.model")
    raise ConfigError(
        f"model.hf_assets_path={raw!r}: {path} has neither tokenizer.json nor tokenizer.model; download the "
        "model's tokenizer there (scripts/download_hf_assets.py) or use ./tests/assets/tokenizer"
    )
