"""scripts/download_hf_assets.py offline: argument handling, file selection, and a clear error without the hub."""

import os
import subprocess
import sys

import pytest

from scripts import download_hf_assets

SCRIPT = download_hf_assets.__file__


def test_arguments_and_defaults():
    args = download_hf_assets.parse_args(["--repo_id", "meta-llama/Llama-3.1-8B", "--assets", "tokenizer", "index"])
    assert (args.repo_id, args.assets, args.hf_token, args.local_dir) == (
        "meta-llama/Llama-3.1-8B", ["tokenizer", "index"], None, "assets/hf/"
    )
    for bad in (["--assets", "tokenizer"], ["--repo_id", "r"], ["--repo_id", "r", "--assets", "weights"]):
        with pytest.raises(SystemExit) as info:
            download_hf_assets.parse_args(bad)
        assert info.value.code == 2


def test_patterns_per_asset():
    assert download_hf_assets.patterns_for(["safetensors", "index", "config", "safetensors"]) == [
        "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json"
    ]
    assert "tokenizer.json" in download_hf_assets.patterns_for(["tokenizer"])


def test_download_calls_the_hub_with_the_selection(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, local_dir, allow_patterns, token):
        calls.append((repo_id, local_dir, allow_patterns, token))
        os.makedirs(local_dir)
        open(os.path.join(local_dir, "config.json"), "w").close()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    argv = ["--repo_id", "org/Model-1B", "--assets", "config", "--hf_token", "tok", "--local_dir", str(tmp_path)]
    assert download_hf_assets.main(argv) == 0
    assert calls == [("org/Model-1B", str(tmp_path / "Model-1B"), ["config.json", "generation_config.json"], "tok")]


def test_unreachable_hub_is_one_clear_line(tmp_path):
    cmd = [sys.executable, SCRIPT, "--repo_id", "meta-llama/Llama-3.1-8B", "--assets", "tokenizer", "config"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    proc = subprocess.run(cmd + ["--local_dir", str(tmp_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: cannot download meta-llama/Llama-3.1-8B (HF_HUB_OFFLINE=1 is set): connect to huggingface.co "
        "(unset HF_HUB_OFFLINE) and retry\n"
    )
