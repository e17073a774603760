"""The Accelerate-style API under torchrun on CPU/gloo: the shipped example trains (loss falls) with
data_parallel 2 and tensor_parallel 2; prepared FSDP2 and TP2 match one process over 5 optimizer steps with
gradient accumulation (our llama3, transformers Qwen3 and tied Qwen2 too, under DDP 2 and TP 2); save_state
under FSDP2 (with CPU offload), then load_state under TP2, continues like the uninterrupted single-process
run; prepare() refuses, in one line, a TP layout it has no plan for and a sequence length sequence parallel
cannot shard."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.integration_tests.runner import REPO, load_dcp_tensors

pytestmark = pytest.mark.slow

PARITY = REPO / "tests/integration_tests/accelerate_parity.py"
EXAMPLE = REPO / "examples/accelerate_loop.py"
TOL = 1e-4


def launch(script: Path, nproc: int, *args: str, timeout: int = 600) -> str:
    """Run `script` with torchrun on `nproc` CPU ranks; returns stdout (fails the test on a non-zero exit)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torchtitan.tools.launch", "--nproc_per_node", str(nproc),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_prepared_fsdp2_and_tp2_match_one_process_and_resume_across_layouts(tmp_path):
    launch(PARITY, 1, "--steps", "7", "--out", str(tmp_path / "ref.json"))
    launch(PARITY, 2, "--cpu_offload", "--steps", "5", "--save", str(tmp_path / "ckpt"), "--out", str(tmp_path / "fsdp.json"))
    launch(PARITY, 2, "--tp", "2", "--steps", "5", "--load", str(tmp_path / "ckpt"), "--more", "2",
           "--check_errors", "--out", str(tmp_path / "tp.json"))
    ref, fsdp, tp = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ref", "fsdp", "tp"))
    assert ref["steps"][-1]["loss"] != ref["steps"][0]["loss"]  # the weights do move
    for name, run in (("fsdp2", fsdp["steps"]), ("tp2", tp["steps"]), ("tp2 resumed from fsdp2", tp["resumed"])):
        expected = ref["steps"][:5] if "resumed" not in name else ref["steps"][5:]
        assert len(run) == len(expected), name
        for step, (got, want) in enumerate(zip(run, expected)):
            for key in ("loss", "grad_norm", "lr"):
                assert abs(got[key] - want[key]) <= TOL * max(1.0, abs(want[key])), (name, step, key, got, want)
    # our llama3 Transformer through its parallelize_fn; Qwen3 (q/k norms) and tied Qwen2 through the HF plan
    for family in ("llama3", "qwen3", "qwen2"):
        for name, run in (("ddp2", fsdp), ("tp2", tp)):
            assert all(abs(a - b) <= TOL for a, b in zip(run[family], ref[family], strict=True)), (family, name, run)
    errors = tp["errors"]
    assert "\n" not in errors["generic_module_tp"]
    assert "tensor_parallel_degree=2" in errors["generic_module_tp"] and "Sequential" in errors["generic_module_tp"]
    assert "sequence length 15 is not divisible by tensor_parallel_degree=2" in errors["odd_sequence_length"]

    # save_model under FSDP2: full HF weights that transformers loads, equal to the DCP checkpoint's
    exported, info = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt_hf", output_loading_info=True)
    assert not any(info.values()), info
    saved = load_dcp_tensors(tmp_path / "ckpt")
    for name, param in exported.state_dict().items():
        assert torch.equal(param, saved[f"model_0.{name}"]), name


@pytest.mark.parametrize("tensor_parallel", ["1", "2"], ids=["data_parallel2", "tensor_parallel2"])
def test_example_loss_falls(tensor_parallel):
    out = launch(EXAMPLE, 2, "--tensor_parallel", tensor_parallel, "--steps", "11")
    losses = [float(x) for x in re.findall(r"Step \d+, Loss: ([\d.]+)", out)]
    assert len(losses) == 2, out
    assert losses[-1] < losses[0] - 0.1, losses
    assert "Training completed!" in out
