"""scripts/checkpoint_conversion: DCP -> HF -> DCP round trip with identical tensors, and error exits."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from scripts.checkpoint_conversion import convert_from_hf, convert_to_hf
from tests.unit_tests.test_checkpoint import REPO, read_folder
from torchtitan.components.checkpoint_hf import conversion_model
from torchtitan.components.checkpoint_storage import Comm, prepare_write, write_dcp

TOKENIZER = os.path.join(REPO, "tests", "assets", "tokenizer")


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A debugmodel training checkpoint (model + other states) with random weights; returns (folder, weights)."""
    _, _, weights = conversion_model("llama3", "debugmodel", TOKENIZER)
    torch.manual_seed(0)
    weights = {k: torch.randn_like(v) for k, v in weights.items()}
    folder = str(tmp_path_factory.mktemp("dcp") / "step-10")
    state = {**weights, "optimizer": {"state.norm.weight.exp_avg": torch.ones(3)}, "train_state": {"step": 10}}
    write_dcp(state, prepare_write(folder, Comm(None)), folder, Comm(None))
    return folder, weights


def test_round_trip_gives_identical_tensors(training_checkpoint, tmp_path):
    folder, weights = training_checkpoint
    hf = str(tmp_path / "hf")
    argv = [folder, hf, "--model_name", "llama3", "--model_flavor", "debugmodel", "--hf_assets_path", TOKENIZER]
    assert convert_to_hf.main(argv) == 0
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(hf))
    config = json.load(open(os.path.join(hf, "config.json")))
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (2560, 256, 6)
    with safe_open(os.path.join(hf, "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("model.norm.weight"), weights["norm.weight"])
        assert len(list(f.keys())) == len(weights)

    back = str(tmp_path / "dcp")
    assert convert_from_hf.main([hf, back, "--model_flavor", "debugmodel"]) == 0
    loaded = read_folder(back)
    assert loaded.keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(loaded[k], v), k


def test_bfloat16_export(training_checkpoint, tmp_path):
    folder, weights = training_checkpoint
    hf = str(tmp_path / "hf")
    argv = [folder, hf, "--model_flavor", "debugmodel", "--hf_assets_path", TOKENIZER, "--export_dtype", "bfloat16"]
    assert convert_to_hf.main(argv) == 0
    with safe_open(os.path.join(hf, "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), weights["tok_embeddings.weight"].bfloat16())


def test_errors_exit_2_with_one_line(training_checkpoint, tmp_path, capsys):
    folder, _ = training_checkpoint
    assert convert_to_hf.main([folder, str(tmp_path / "o"), "--model_flavor", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.flavor='tiny' is not a flavor of 'llama3'; choose one of [") and err.count("\n") == 1
    assert convert_to_hf.main([folder, str(tmp_path / "o"), "--model_flavor", "debugmodel"]) == 2
    assert "takes its vocab_size from the tokenizer, but none was given" in capsys.readouterr().err
    assert convert_from_hf.main([str(tmp_path / "none"), str(tmp_path / "o"), "--model_flavor", "debugmodel"]) == 2
    assert f"Hugging Face checkpoint folder {tmp_path / 'none'} does not exist" in capsys.readouterr().err


def test_cli_entry_point(tmp_path):
    missing = str(tmp_path / "missing")
    cmd = [sys.executable, "-m", "scripts.checkpoint_conversion.convert_to_hf", missing, str(tmp_path / "o")]
    proc = subprocess.run(cmd + ["--model_flavor", "debugmodel"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: checkpoint folder {missing} does not exist: point the load path at an existing step folder\n"
    )
