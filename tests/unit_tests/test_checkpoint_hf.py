"""Hugging Face export (last_save_in_hf) and import (initial_load_in_hf) with the real Llama 3 model."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from tests.unit_tests.test_checkpoint import Run, assert_same, cfg
from torchtitan.components.checkpoint_hf import save_hf, shard_index
from torchtitan.components.checkpoint_storage import Comm
from torchtitan.config import ConfigError
from torchtitan.models.llama3 import Llama3StateDictAdapter, Transformer, TransformerModelArgs

transformers = pytest.importorskip("transformers")

VOCAB = 128


def llama_args(dim: int = 64) -> TransformerModelArgs:
    return TransformerModelArgs(
        dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32, rope_theta=500000.0,
        max_seq_len=32,
    )


def build_llama(args: TransformerModelArgs) -> Transformer:
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
        for name, p in model.named_parameters():  # non-trivial norms so every weight shows in the logits
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def assets(tmp_path):
    folder = tmp_path / "assets"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "tokenizer_config.json").write_text('{"bos_token": null}')
    return str(folder)


def llama_run(folder: str, assets: str, dim: int = 64, seed: int = 0, **kw) -> Run:
    args = llama_args(dim)
    return Run(
        folder, cfg(**kw), seed=seed, model_fn=lambda: build_llama(args),
        batch_fn=lambda g: torch.randint(0, VOCAB, (2, 16), generator=g),
        sd_adapter=Llama3StateDictAdapter(args, assets), hf_assets_path=assets,
    )


def hf_logits(folder: str, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_last_save_in_hf_loads_in_transformers_with_equal_logits(tmp_path, assets):
    run = llama_run(str(tmp_path), assets, last_save_in_hf=True)
    run.train(2, last=2)
    folder = str(tmp_path / "checkpoint" / "step-2")
    assert sorted(os.listdir(folder)) == [
        ".checksums.json", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]
    config = json.load(open(os.path.join(folder, "config.json")))
    assert (config["model_type"], config["hidden_size"], config["num_key_value_heads"], config["dtype"]) == (
        "llama", 64, 2, "float32"
    )
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours = run.model(tokens)
    theirs = hf_logits(folder, tokens)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5

    # a new run starting from that folder gets exactly the exported weights
    again = llama_run(str(tmp_path / "new"), assets, seed=5, initial_load_in_hf=True, initial_load_path=folder)
    assert again.ckpt.load() and again.ts.step == 0
    assert_same(again.model.state_dict(), run.model.state_dict())
    # ... also when the folder is given as model.hf_assets_path
    from_assets = llama_run(str(tmp_path / "new2"), folder, seed=5, initial_load_in_hf=True)
    assert from_assets.ckpt.load()
    assert_same(from_assets.model.state_dict(), run.model.state_dict())


def test_hf_export_in_bfloat16(tmp_path, assets):
    run = llama_run(str(tmp_path), assets, last_save_in_hf=True, export_dtype="bfloat16")
    run.train(1, last=1)
    folder = str(tmp_path / "checkpoint" / "step-1")
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert torch.equal(f.get_tensor("model.norm.weight"), run.model.norm.weight.detach().bfloat16())
    assert json.load(open(os.path.join(folder, "config.json")))["dtype"] == "bfloat16"


def test_sharded_export_writes_an_index(tmp_path, assets):
    args = llama_args()
    torch.manual_seed(0)
    model = build_llama(args)
    folder = tmp_path / "hf"
    folder.mkdir()
    adapter = Llama3StateDictAdapter(args, assets)
    save_hf(model.state_dict(), adapter, str(folder), Comm(None), assets, max_shard_bytes=60_000)
    index = json.load(open(folder / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p for p in os.listdir(folder) if p.endswith(".safetensors")) == files
    assert index["weight_map"]["model.embed_tokens.weight"] == files[0]
    tokens = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf_logits(str(folder), tokens), rtol=0, atol=1e-5)


def test_shard_index_keeps_module_order():
    sizes = {"embed": 4, "layers.2.w": 4, "layers.10.w": 3, "head": 2}
    assert shard_index(sizes, 8) == {"embed": 1, "layers.2.w": 1, "layers.10.w": 2, "head": 2}
    assert set(shard_index(sizes, 10**9).values()) == {1}


def test_hf_load_errors(tmp_path, assets):
    run = llama_run(str(tmp_path), assets, last_save_in_hf=True)
    run.train(1, last=1)
    folder = str(tmp_path / "checkpoint" / "step-1")
    wrong = llama_run(str(tmp_path / "w"), assets, dim=32, initial_load_in_hf=True, initial_load_path=folder)
    msg = rf"checkpoint {folder} does not match this run: shape mismatch \[lm_head.weight: checkpoint \[128, 64\] vs"
    with pytest.raises(ConfigError, match=msg + r" model \[128, 32\]"):
        wrong.ckpt.load()
    empty = llama_run(str(tmp_path / "e"), assets, initial_load_in_hf=True, initial_load_path=assets)
    with pytest.raises(ConfigError, match=rf"Hugging Face checkpoint folder {assets} has no \*.safetensors files"):
        empty.ckpt.load()
    weights = os.path.join(folder, "model.safetensors")
    with open(weights, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"xyz")
    tampered = llama_run(str(tmp_path / "t"), assets, initial_load_in_hf=True, initial_load_path=folder)
    with pytest.raises(ConfigError, match=rf"checkpoint {folder} was tampered with: model.safetensors does not match"):
        tampered.ckpt.load()
    os.remove(os.path.join(folder, ".checksums.json"))  # e.g. a folder from the hub: no manifest
    os.truncate(weights, os.path.getsize(weights) - 100)
    cut = llama_run(str(tmp_path / "c"), assets, initial_load_in_hf=True, initial_load_path=folder)
    with pytest.raises(ConfigError, match=rf"Hugging Face checkpoint {folder} is unreadable: SafetensorError: "):
        cut.ckpt.load()
