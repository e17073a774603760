"""Checkpointing end to end through run_train.sh on CPU: exact resume (sync, async, grad accumulation),
crash safety, the save/load policies, model-only and Hugging Face exports, and load errors."""

import copy
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

import torchtitan.models  # noqa: F401  (registers the llama3 TrainSpec)
from torchtitan.config import ConfigManager, JobConfig
from torchtitan.protocols.train_spec import get_train_spec
from tests.integration_tests.runner import (
    DEBUG_CONFIG,
    REPO,
    TINY,
    Run,
    assert_losses_close,
    dcp_dtypes,
    error_lines,
    kill_when,
    load_dcp_tensors,
    logged_steps,
    losses_after,
    run_module,
    run_train,
    start_train,
    step_folders,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

# Every run of this module follows one 20-step LR schedule, so a shorter run is an exact prefix of the
# 20-step reference and a resumed run an exact suffix.
BASE = [*TINY, "--lr_scheduler.total_steps", "20"]
REF = ("--training.steps", "20")
CKPT = ["--checkpoint.enable", "--checkpoint.keep_latest_k", "0"]
# A 3-step run whose last step writes the model-only export (the default last_save_model_only).
FINAL = ("--training.steps", "3", "--checkpoint.enable", "--checkpoint.interval", "100")
STATES = ("optimizer", "lr_scheduler", "dataloader", "train_state")


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory) -> Callable[..., Run]:
    """`run_train(BASE + overrides)`, run once per module for each distinct override list (read-only)."""
    runs: dict[tuple[str, ...], Run] = {}

    def get(*overrides: str) -> Run:
        if overrides not in runs:
            runs[overrides] = run_train(tmp_path_factory.mktemp("run"), *BASE, *overrides)
        return runs[overrides]

    return get


@pytest.fixture(scope="module")
def saved(cached_run) -> Run:
    """6 steps saving full checkpoints after steps 1 (first-step checkpoint), 3 (interval) and 6 (last)."""
    return cached_run(
        "--training.steps", "6", *CKPT, "--checkpoint.interval", "3", "--checkpoint.enable_first_step_checkpoint",
        "--checkpoint.no_last_save_model_only",
    )


def checkpoint_dir(run: Run) -> Path:
    return run.dump_folder / "checkpoint"


def saved_states(step_folder: Path) -> set[str]:
    """The non-model states in a DCP checkpoint (the model's FQNs are top-level keys)."""
    return {key.split(".", 1)[0] for key in dcp_dtypes(step_folder)} & set(STATES)


def copy_steps(src: Run, dump_folder: Path, *steps: int) -> None:
    """Put `src`'s step folders into `dump_folder`'s checkpoint folder, as if that run had saved them."""
    for step in steps:
        shutil.copytree(checkpoint_dir(src) / f"step-{step}", dump_folder / "checkpoint" / f"step-{step}")


# ---------------------------------------------------------------- in-test model and data

def job_config(*overrides: str) -> JobConfig:
    return ConfigManager().parse_args(["--job.config_file", str(DEBUG_CONFIG), *BASE, *overrides])


def first_batch(jc: JobConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, labels) of step 1 on one process."""
    spec = get_train_spec(jc.model.name)
    inputs, labels = next(iter(spec.build_dataloader_fn(1, 0, spec.build_tokenizer_fn(jc), jc)))
    return inputs["input"], labels


def load_our_model(step_folder: Path, jc: JobConfig) -> torch.nn.Module:
    """Our model with the weights of a DCP checkpoint (only the model keys are read)."""
    spec = get_train_spec(jc.model.name)
    args = copy.deepcopy(spec.model_args[jc.model.flavor])
    args.update_from_config(jc, spec.build_tokenizer_fn(jc))
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(step_folder), no_dist=True)
    model.load_state_dict(state)
    return model.eval()


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100).item()


# ---------------------------------------------------------------- exact resume

@pytest.mark.parametrize(
    "data, mode",
    [
        pytest.param([], [], id="sync"),
        pytest.param([], ["--checkpoint.async_mode", "async"], id="async"),
        pytest.param([], ["--checkpoint.async_mode", "async_with_pinned_mem"], id="async-pinned-mem"),
        pytest.param(["--training.global_batch_size", "8"], [], id="grad-accum"),
    ],
)
def test_resume_is_exact(tmp_path, cached_run, data, mode):
    """Stop after step 15 (saved at 10, exported at 15), resume from step 10 to 20: every loss, before and
    after the resume, is bitwise the uninterrupted run's (so saving, async or not, perturbs nothing)."""
    ref = cached_run(*REF, *data).losses()
    ckpt = [*data, *CKPT, "--checkpoint.interval", "10", *mode]
    first = run_train(tmp_path, *BASE, *ckpt, "--training.steps", "15")
    assert_losses_close(first.losses(), ref, 0, steps=list(range(1, 16)))
    assert step_folders(checkpoint_dir(first)) == [10, 15]
    assert saved_states(checkpoint_dir(first) / "step-10") == set(STATES)

    n = len(first.metrics())
    resumed = run_train(tmp_path, *BASE, *ckpt, "--training.steps", "20", "--checkpoint.load_step", "10")
    assert_losses_close(losses_after(resumed, n), ref, 0, steps=list(range(11, 21)))


# ---------------------------------------------------------------- crash safety

def killed_then_resumed(
    dump_folder: Path, overrides: list[str], condition: Callable[[], bool], env: dict[str, str] | None = None
) -> tuple[list[int], dict[int, float]]:
    """Start a 20-step job, SIGKILL it when `condition()` holds, restart it unchanged in the same folder.

    Returns the complete steps found after the kill and the losses the restarted run logged."""
    kill_when(start_train(dump_folder, *BASE, *overrides, "--training.steps", "20", env=env), condition)
    complete = step_folders(dump_folder / "checkpoint")
    n = len(logged_steps(dump_folder))
    resumed = run_train(dump_folder, *BASE, *overrides, "--training.steps", "20")
    return complete, losses_after(resumed, n)


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_kill_during_save_resumes_from_the_previous_step(tmp_path, cached_run, mode):
    """SIGKILL while step 10 is being saved (its files written, the folder not yet committed: the job runs
    `slow_commit_train`, which pauses there): step 10 does not count, the restart resumes from step 5,
    removes the leftover, and matches the uninterrupted run."""
    ref = cached_run(*REF).losses()
    overrides = [*CKPT, "--checkpoint.interval", "5", "--checkpoint.async_mode", mode]
    partial = tmp_path / "checkpoint" / "step-10.tmp"
    complete, resumed = killed_then_resumed(
        tmp_path, overrides, lambda: (partial / ".metadata").exists(),
        env={"TRAIN_FILE": "tests.integration_tests.slow_commit_train"},
    )
    assert complete == [5]
    assert_losses_close(resumed, ref, 0, steps=list(range(6, 21)))
    assert not partial.exists()
    assert step_folders(tmp_path / "checkpoint") == [5, 10, 15, 20]


def test_kill_during_a_step_resumes_from_the_last_checkpoint(tmp_path, cached_run):
    """SIGKILL in the middle of training (after step 12 was logged): the restart resumes from step 10."""
    ref = cached_run(*REF).losses()
    killed_at: list[int] = []

    def past_step_12() -> bool:
        killed_at[:] = logged_steps(tmp_path)
        return bool(killed_at) and killed_at[-1] >= 12

    complete, resumed = killed_then_resumed(tmp_path, [*CKPT, "--checkpoint.interval", "10"], past_step_12)
    assert killed_at[-1] < 20, killed_at
    assert complete == [10]
    assert_losses_close(resumed, ref, 0, steps=list(range(11, 21)))


# ---------------------------------------------------------------- save and load policies

def test_interval_first_step_and_last_step_saves(cached_run, saved):
    """Saves after step 1 (enable_first_step_checkpoint), 3 (interval) and 6 (last, full with
    no_last_save_model_only); each holds the whole training state; training is unchanged by saving."""
    assert step_folders(checkpoint_dir(saved)) == [1, 3, 6]
    for step in (1, 3, 6):
        assert saved_states(checkpoint_dir(saved) / f"step-{step}") == set(STATES)
    assert_losses_close(saved.losses(), cached_run(*REF).losses(), 0, steps=list(range(1, 7)))


def test_keep_latest_k_purges_older_steps(cached_run):
    run = cached_run("--training.steps", "6", "--checkpoint.enable", "--checkpoint.interval", "1",
                     "--checkpoint.keep_latest_k", "2")
    assert step_folders(checkpoint_dir(run)) == [5, 6]
    assert saved_states(checkpoint_dir(run) / "step-5") == set(STATES)
    assert saved_states(checkpoint_dir(run) / "step-6") == set()  # the model-only last save


def test_load_step_with_load_only(tmp_path, cached_run, saved):
    """load_step 3 resumes from step 3 although step 6 is newer; load_only writes nothing."""
    copy_steps(saved, tmp_path, 1, 3, 6)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoint").rglob("*")}
    run = run_train(tmp_path, *BASE, "--training.steps", "6", "--checkpoint.enable", "--checkpoint.interval", "1",
                    "--checkpoint.load_step", "3", "--checkpoint.load_only")
    assert_losses_close(run.losses(), cached_run(*REF).losses(), 0, steps=[4, 5, 6])
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoint").rglob("*")} == before


def test_exclude_from_loading_keeps_fresh_states(tmp_path, cached_run, saved):
    """Resuming from step 3 without optimizer, lr_scheduler and dataloader: the step counter and model are
    restored, but data starts over (step 4 sees step 1's batch) and so does the LR schedule."""
    copy_steps(saved, tmp_path, 3)
    run = run_train(tmp_path, *BASE, "--training.steps", "6", "--checkpoint.enable", "--checkpoint.load_only",
                    "--checkpoint.exclude_from_loading", "optimizer,lr_scheduler,dataloader")
    assert sorted(run.losses()) == [4, 5, 6]
    jc = job_config()
    inputs, labels = first_batch(jc)
    with torch.no_grad():
        expected = mean_loss(load_our_model(checkpoint_dir(saved) / "step-3", jc)(inputs), labels)
    assert math.isclose(run.losses()[4], expected, rel_tol=1e-5), (run.losses()[4], expected)
    assert not math.isclose(expected, cached_run(*REF).losses()[4], rel_tol=1e-3)  # batch 1 is not batch 4
    assert run.metrics()[0]["lr"] == cached_run(*REF).metrics()[0]["lr"]


# ---------------------------------------------------------------- exports

def test_model_only_last_save_in_float32_and_bfloat16(cached_run):
    """The last save holds only the model, in export_dtype; bf16 is exactly the fp32 weights rounded."""
    fp32 = cached_run(*FINAL)
    bf16 = cached_run(*FINAL, "--checkpoint.export_dtype", "bfloat16")
    assert fp32.losses() == bf16.losses()
    fp32_dtypes = dcp_dtypes(checkpoint_dir(fp32) / "step-3")
    bf16_dtypes = dcp_dtypes(checkpoint_dir(bf16) / "step-3")
    assert "tok_embeddings.weight" in fp32_dtypes and "output.weight" in fp32_dtypes
    assert not {key.split(".", 1)[0] for key in fp32_dtypes} & set(STATES)
    assert set(fp32_dtypes.values()) == {torch.float32}
    assert bf16_dtypes == dict.fromkeys(fp32_dtypes, torch.bfloat16)
    fp32_sd = load_dcp_tensors(checkpoint_dir(fp32) / "step-3")
    bf16_sd = load_dcp_tensors(checkpoint_dir(bf16) / "step-3")
    for key, value in fp32_sd.items():
        assert torch.equal(bf16_sd[key], value.to(torch.bfloat16)), key


def test_hf_export_matches_transformers_and_loads_back(tmp_path, cached_run):
    """last_save_in_hf writes a folder transformers loads directly; its logits equal our model's (same
    weights from the DCP export of an identical run); a new run started from it with initial_load_in_hf
    logs, at step 1, the loss the HF model gives on step 1's batch."""
    transformers = pytest.importorskip("transformers")
    ours_run, hf_run = cached_run(*FINAL), cached_run(*FINAL, "--checkpoint.last_save_in_hf")
    assert ours_run.losses() == hf_run.losses()
    hf_dir = checkpoint_dir(hf_run) / "step-3"
    files = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= files, files

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    assert hf.dtype == torch.float32
    jc = job_config()
    inputs, labels = first_batch(jc)
    with torch.no_grad():
        hf_logits = hf(input_ids=inputs).logits
        ours = load_our_model(checkpoint_dir(ours_run) / "step-3", jc)(inputs)
    rel = ((ours - hf_logits).abs().max() / hf_logits.abs().max()).item()
    assert rel < 1e-5, rel

    loaded = run_train(tmp_path, *BASE, "--training.steps", "1", "--checkpoint.enable", "--checkpoint.load_only",
                       "--checkpoint.initial_load_in_hf", "--checkpoint.initial_load_path", str(hf_dir))
    expected = mean_loss(hf_logits, labels)
    assert math.isclose(loaded.losses()[1], expected, rel_tol=1e-5), (loaded.losses()[1], expected)
    assert not math.isclose(expected, ours_run.losses()[1], rel_tol=1e-3)  # trained, not fresh, weights


def test_conversion_scripts_round_trip(tmp_path, cached_run):
    """convert_to_hf then convert_from_hf gives back every tensor exactly, and convert_to_hf writes the
    same tensors as the trainer's own last_save_in_hf export of the same weights."""
    from safetensors.torch import load_file

    step = checkpoint_dir(cached_run(*FINAL)) / "step-3"
    hf_dir, dcp_dir = tmp_path / "hf", tmp_path / "dcp"
    model = ["--model_name", "llama3", "--model_flavor", "debugmodel"]
    for script, args in (
        ("convert_to_hf.py", [str(step), str(hf_dir), *model, "--hf_assets_path", "./tests/assets/tokenizer"]),
        ("convert_from_hf.py", [str(hf_dir), str(dcp_dir), *model]),
    ):
        proc = subprocess.run([sys.executable, f"scripts/checkpoint_conversion/{script}", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    original, back = load_dcp_tensors(step), load_dcp_tensors(dcp_dir)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], v) for k, v in original.items())
    exported = load_file(checkpoint_dir(cached_run(*FINAL, "--checkpoint.last_save_in_hf")) / "step-3" / "model.safetensors")
    converted = load_file(hf_dir / "model.safetensors")
    assert converted.keys() == exported.keys()
    assert all(torch.equal(converted[k], v) for k, v in exported.items())


# ---------------------------------------------------------------- errors

def assert_one_line_error(run: Run, *fragments: str) -> None:
    """Exit code 2 and exactly one `error:` line, naming each fragment, without a traceback."""
    lines = error_lines(run)
    assert run.returncode == 2 and len(lines) == 1, (run.returncode, run.stderr[-3000:])
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])
    assert "Traceback" not in run.stderr


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst / "step-3"))


def _largest_data_file(folder: Path) -> Path:
    return max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _unreadable(src: Path, dst: Path) -> Path:
    (folder := _copy(src, dst)).joinpath(".metadata").write_bytes(b"not a checkpoint")
    return folder


def _truncated(src: Path, dst: Path) -> Path:
    data_file = _largest_data_file(folder := _copy(src, dst))
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    return folder


def _tampered(src: Path, dst: Path) -> Path:
    data_file = _largest_data_file(folder := _copy(src, dst))
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data_file.write_bytes(bytes(data))
    return folder


def _resaved(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path, Path], Path]:
    """A checkpoint of another model: the weights of `src` changed by `edit`, saved with DCP."""

    def make(src: Path, dst: Path) -> Path:
        state = load_dcp_tensors(src)
        edit(state)
        dcp.save(state, checkpoint_id=str(dst / "other"), no_dist=True)
        return dst / "other"

    return make


@pytest.mark.parametrize(
    "make, problem",
    [
        pytest.param(lambda src, dst: dst / "absent", "does not exist", id="missing"),
        pytest.param(lambda src, dst: src.parent, "incomplete or not a DCP checkpoint", id="folder-of-steps"),
        pytest.param(_unreadable, "unreadable", id="unreadable"),
        pytest.param(_truncated, "truncated", id="truncated"),
        pytest.param(_tampered, "tampered", id="tampered"),
        pytest.param(_resaved(lambda sd: sd.pop("norm.weight")), "missing keys", id="missing-key"),
        pytest.param(_resaved(lambda sd: sd.update(extra=torch.zeros(3))), "unexpected keys", id="unexpected-key"),
        pytest.param(_resaved(lambda sd: sd.update({"norm.weight": torch.ones(7)})), "shape mismatch",
                     id="shape-mismatch"),
    ],
)
def test_bad_initial_checkpoint_is_one_line_error(tmp_path, cached_run, make, problem):
    folder = make(checkpoint_dir(cached_run(*FINAL)) / "step-3", tmp_path)
    run = run_module(tmp_path / "run", *BASE, "--training.steps", "1", "--checkpoint.enable",
                     "--checkpoint.initial_load_path", str(folder))
    assert_one_line_error(run, str(folder), problem)
    assert logged_steps(tmp_path / "run") == []


@pytest.mark.parametrize(
    "overrides, key",
    [
        pytest.param(["--checkpoint.keep_latest_k", "1"], "checkpoint.keep_latest_k", id="keep-latest-1"),
        pytest.param(["--checkpoint.load_step", "7"], "checkpoint.load_step=7", id="absent-load-step"),
        pytest.param(["--checkpoint.exclude_from_loading", "optimiser"], "checkpoint.exclude_from_loading",
                     id="unknown-state"),
    ],
)
def test_bad_checkpoint_option_is_one_line_error(tmp_path, overrides, key):
    run = run_module(tmp_path, *BASE, "--training.steps", "1", "--checkpoint.enable", *overrides)
    assert_one_line_error(run, key)
