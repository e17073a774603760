"""Tiny Hugging Face checkpoints of each family the transformers modeling backend supports, written with
random weights by `save_pretrained`, with a small trained tokenizer.json: the tests' stand-ins for hub models."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512
_SIZES = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=None,
)
_LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,  # < seq_len: the scaling matters
}


def family_config(family: str):
    """The transformers config of a tiny `family` model: llama (Llama 3 rope scaling), qwen2 (q/k/v bias,
    tied embeddings like Qwen2.5-0.5B), qwen3 (q/k norms, head_dim != hidden/heads), mistral, smollm
    (Llama with tied embeddings, like SmolLM2)."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**_SIZES, rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=False)
    if family == "smollm":
        return tf.LlamaConfig(**_SIZES, tie_word_embeddings=True)
    if family == "qwen2":
        return tf.Qwen2Config(**_SIZES, tie_word_embeddings=True)
    if family == "qwen3":
        return tf.Qwen3Config(**_SIZES, head_dim=32, tie_word_embeddings=False)
    if family == "mistral":
        return tf.MistralConfig(**_SIZES, sliding_window=None, tie_word_embeddings=False)
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "smollm")


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer.json (VOCAB tokens, <s>=0 </s>=1) trained on the shipped corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with gzip.open(REPO / "tests/assets/shakespeare/validation-00000-of-00001.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def write_hf_model(folder: Path, family: str, seed: int = 0, tokenizer: bool = True) -> Path:
    """Save a randomly initialized tiny `family` model (fp32 safetensors + config.json) into `folder`."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(family_config(family), dtype=torch.float32)
    model.save_pretrained(folder)
    if tokenizer:
        write_tokenizer(folder)
    return folder
