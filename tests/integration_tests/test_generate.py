"""scripts/generate/generate.py on the default debug job's last checkpoint: greedy tokens from its Hugging Face
export equal transformers' `generate` on the same folder, the DCP step folder and 2-rank tensor parallel
print the same text, and bad input exits 2 with one line."""

import os
import subprocess
import sys

import pytest
import torch

from scripts.checkpoint_conversion import convert_to_hf
from scripts.generate import generate
from tests.integration_tests.runner import DEBUG_CONFIG, REPO, TINY, run_train
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.config import ConfigManager
from torchtitan.distributed.parallel_dims import ParallelDims

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPT = "ROMEO: What light through yonder window"
NEW = 24
TOKENIZER = str(REPO / "tests/assets/tokenizer")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[str, str]:
    """(the last DCP step folder of a short default debug job, its Hugging Face export)."""
    dump = tmp_path_factory.mktemp("job")
    run_train(dump, *TINY, "--training.steps", "3", "--checkpoint.enable", "--checkpoint.interval", "3")
    step = str(dump / "checkpoint" / "step-3")
    hf = str(dump / "hf")
    assert convert_to_hf.main([step, hf, "--model_flavor", "debugmodel", "--hf_assets_path", TOKENIZER]) == 0
    return step, hf


@pytest.fixture(scope="module")
def expected(checkpoints) -> tuple[list[int], list[int]]:
    """(prompt ids, transformers' greedy continuation of the HF export)."""
    tokenizer = build_tokenizer(ConfigManager().parse_args([]))
    prompt = tokenizer.encode(PROMPT, bos=True, eos=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[1], dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=tokenizer.eos_id,
                      pad_token_id=tokenizer.eos_id)
    return prompt, out[0, len(prompt):].tolist()


def test_greedy_tokens_equal_transformers(checkpoints, expected):
    prompt, theirs = expected
    job = ConfigManager().parse_args(["--job.config_file", str(DEBUG_CONFIG)])
    pd = ParallelDims.from_job_config(job, 1)
    tokenizer = build_tokenizer(job)
    model = generate.load_model(job, checkpoints[1], torch.device("cpu"), pd, tokenizer, len(prompt) + NEW)
    ours = generate.generate(model, prompt, NEW, eos_id=tokenizer.eos_id)
    assert len(ours) == NEW and ours == theirs


def test_cli_on_dcp_and_tensor_parallel(checkpoints, expected, capsys):
    tokenizer = build_tokenizer(ConfigManager().parse_args([]))
    text = PROMPT + tokenizer.decode(expected[1])
    args = ["--job.config_file", str(DEBUG_CONFIG), "--prompt", PROMPT, "--max_new_tokens", str(NEW)]
    assert generate.main([*args, "--checkpoint", checkpoints[0]]) == 0
    assert capsys.readouterr().out == text + "\n"

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--local-ranks-filter", "0",
           "scripts/generate/generate.py", *args, "--checkpoint", checkpoints[1]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert text in proc.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--checkpoint", "/nonexistent/step-1"], "--checkpoint /nonexistent/step-1 does not exist"),
        (["--checkpoint", "x", "--max_new_tokens", "0"], "--max_new_tokens=0 is invalid"),
        (["--checkpoint", "x", "--model.flavor", "nope"], "model.flavor='nope' is not a flavor"),
    ],
)
def test_errors_exit_2_with_one_line(extra, message, capsys):
    assert generate.main(["--prompt", "hi", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
