"""Tokenizers: the shipped tiktoken-format BPE, HF tokenizer.json, selection and errors."""

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from torchtitan.components.tokenizer import (
    MAX_RUN_CHARS,
    HuggingFaceTokenizer,
    TikTokenizer,
    _encode_pieces,
    build_tokenizer,
    llama3_special_tokens,
)
from torchtitan.config import ConfigError, JobConfig

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SHIPPED = ASSETS / "tokenizer"


def job_config(hf_assets_path: str | Path) -> JobConfig:
    config = JobConfig()
    config.model.hf_assets_path = str(hf_assets_path)
    return config


@pytest.fixture(scope="module")
def shipped() -> TikTokenizer:
    tokenizer = build_tokenizer(JobConfig())  # default model.hf_assets_path = ./tests/assets/tokenizer
    assert isinstance(tokenizer, TikTokenizer)
    return tokenizer


def test_llama3_special_token_layout():
    specials = llama3_special_tokens()
    assert len(specials) == 256 and len(set(specials)) == 256
    assert specials[:11] == [
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
    assert specials[11] == "<|reserved_special_token_3|>"
    assert specials[-1] == "<|reserved_special_token_247|>"


def test_shipped_tokenizer_ids(shipped):
    base = 2304  # 256 single bytes + 2048 merges
    assert shipped.vocab_size == base + 256
    assert (shipped.bos_id, shipped.eos_id, shipped.pad_id) == (base, base + 1, base + 4)
    assert shipped.special_tokens["<|eot_id|>"] == base + 9
    assert shipped.special_tokens["<|reserved_special_token_247|>"] == base + 255
    assert shipped.decode([shipped.bos_id, shipped.eos_id]) == "<|begin_of_text|><|end_of_text|>"
    # every single byte has a rank, so arbitrary bytes are representable
    assert shipped.encode("\x00") == [0] and shipped.encode("A") == [ord("A")]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ROMEO:\nBut, soft! what light through yonder window breaks?",
        "  tabs\tand\r\nCRLF  ",
        "naïve café 日本語 🎭",
    ],
)
def test_shipped_round_trip_and_bos_eos(shipped, text):
    ids = shipped.encode(text)
    assert shipped.decode(ids) == text
    assert all(0 <= i < 2304 for i in ids)  # plain text never produces special ids
    assert shipped.encode(text, bos=True, eos=True) == [shipped.bos_id, *ids, shipped.eos_id]
    assert shipped.encode(text, bos=True) == [shipped.bos_id, *ids]


def test_shipped_compresses_its_corpus(shipped):
    with gzip.open(ASSETS / "shakespeare/validation-00000-of-00001.jsonl.gz", "rt") as f:
        docs = [json.loads(line)["text"] for line in f]
    n_tokens = 0
    for doc in docs:
        ids = shipped.encode(doc)
        assert shipped.decode(ids) == doc
        n_tokens += len(ids)
    assert 2.5 < sum(map(len, docs)) / n_tokens < 4.0  # chars per token on held-out plays (bytes would be 1.0)


def test_special_token_text_is_encoded_as_text(shipped):
    ids = shipped.encode("<|end_of_text|>")
    assert shipped.eos_id not in ids and len(ids) > 1
    assert shipped.decode(ids) == "<|end_of_text|>"


def test_long_inputs_are_split_and_round_trip(shipped):
    text = "a" * (3 * MAX_RUN_CHARS + 7) + " " * (MAX_RUN_CHARS + 1) + "end"
    pieces = list(_encode_pieces(text))
    assert "".join(pieces) == text and len(pieces) == 5
    longest_run = max(len(m.group()) for p in pieces for m in re.finditer(r"\s+|\S+", p))
    assert longest_run == MAX_RUN_CHARS
    assert shipped.decode(shipped.encode(text)) == text
    big = "To be, or not to be. " * 30_000  # 630k chars: more than one 400k-char chunk
    assert shipped.decode(shipped.encode(big)) == big


def test_shipped_tokenizer_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert build_tokenizer(JobConfig()).vocab_size == 2560


def test_tokenizer_model_file_path(shipped):
    tokenizer = build_tokenizer(job_config(SHIPPED / "tokenizer.model"))
    assert tokenizer.encode("Exeunt") == shipped.encode("Exeunt")


def _tiny_hf_tokenizer(folder: Path, config: dict | None) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["Now is the winter of our discontent"] * 20, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_hf_tokenizer_json_preferred_with_config_specials(tmp_path):
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>"}
    _tiny_hf_tokenizer(tmp_path, config)
    shutil.copy(SHIPPED / "tokenizer.model", tmp_path / "tokenizer.model")  # tokenizer.json wins
    tokenizer = build_tokenizer(job_config(tmp_path))
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert tokenizer.vocab_size == len(vocab) > 259  # 256 bytes + 3 specials + learned merges
    text = "Now is the winter of our discontent, made glorious summer"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and 0 not in ids and 1 not in ids
    assert tokenizer.encode(text, bos=True, eos=True) == [0, *ids, 1]
    assert len(tokenizer.encode("Now is the winter")) < len("Now is the winter")  # merges were learned


def test_hf_tokenizer_without_config_has_no_bos_eos(tmp_path):
    _tiny_hf_tokenizer(tmp_path, None)
    tokenizer = build_tokenizer(job_config(tmp_path / "tokenizer.json"))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (None, None, None)
    assert tokenizer.encode("winter", bos=True, eos=True) == tokenizer.encode("winter")


def test_hf_tokenizer_unknown_config_token(tmp_path):
    _tiny_hf_tokenizer(tmp_path, {"bos_token": "<|begin_of_text|>"})
    with pytest.raises(ConfigError, match=r"bos_token='<\|begin_of_text\|>', which is not in the tokenizer"):
        build_tokenizer(job_config(tmp_path))


def test_missing_folder_error(tmp_path):
    missing = tmp_path / "nope"
    expected = r"model.hf_assets_path='.*nope' does not exist.*tokenizer.json or tokenizer.model"
    with pytest.raises(ConfigError, match=expected):
        build_tokenizer(job_config(missing))


def test_folder_without_tokenizer_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"model.hf_assets_path=.* has neither tokenizer.json nor tokenizer.model"):
        build_tokenizer(job_config(tmp_path))


def test_malformed_files_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a ranks file\n")
    with pytest.raises(ConfigError, match=r"model.hf_assets_path: .*tokenizer.model is not a tiktoken ranks file"):
        build_tokenizer(job_config(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ConfigError, match=r"model.hf_assets_path: .*tokenizer.json is not a valid tokenizer.json"):
        build_tokenizer(job_config(tmp_path))


def test_fingerprint_follows_content_not_location(tmp_path, shipped):
    shutil.copy(SHIPPED / "tokenizer.model", tmp_path / "tokenizer.model")
    assert build_tokenizer(job_config(tmp_path)).fingerprint == shipped.fingerprint
    assert shipped.fingerprint.startswith("tiktoken-sha256:")
    hf = tmp_path / "hf"
    _tiny_hf_tokenizer(hf, {"bos_token": "<s>", "eos_token": "</s>"})
    before = build_tokenizer(job_config(hf)).fingerprint
    (hf / "tokenizer_config.json").write_text(json.dumps({"bos_token": "</s>", "eos_token": "<s>"}))
    assert build_tokenizer(job_config(hf)).fingerprint != before  # BOS/EOS are part of the tokenizer
