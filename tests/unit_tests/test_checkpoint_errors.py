"""Every bad checkpoint folder gives one ConfigError line naming the folder and the problem, and loads nothing."""

import os
import pickle

import pytest
import torch

from tests.unit_tests.test_checkpoint import Run, assert_same, cfg
from torchtitan.components.checkpoint_storage import DCP_METADATA, MANIFEST
from torchtitan.config import ConfigError


@pytest.fixture
def saved(tmp_path):
    """A run with full checkpoints at steps 2 and 4; returns (run, step-4 path)."""
    run = Run(str(tmp_path / "src"), cfg())
    run.train(4)
    return run, str(tmp_path / "src" / "checkpoint" / "step-4")


def load_from(path: str, tmp_path, **kw) -> Run:
    """A fresh run that loads `path` as its initial checkpoint (model and all states)."""
    run = Run(str(tmp_path / "dst"), cfg(initial_load_path=path, initial_load_model_only=False), seed=7, **kw)
    run.before = {k: v.clone() for k, v in run.model.state_dict().items()}
    return run


def expect_error(run: Run, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        run.ckpt.load()
    assert "\n" not in str(info.value)
    assert_same(run.model.state_dict(), run.before)  # nothing was loaded
    assert run.ts.step == 0


class Custom:
    """Any class outside weights_only's allow-list."""


def flip_byte(path: str, offset: int) -> None:
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_missing_folder(tmp_path):
    expect_error(load_from(str(tmp_path / "nope"), tmp_path), r"checkpoint folder .*/nope does not exist")


def test_folder_of_steps_instead_of_a_step(saved, tmp_path):
    root = os.path.dirname(saved[1])
    expect_error(
        load_from(root, tmp_path),
        rf"checkpoint folder {root} is incomplete or not a DCP checkpoint: no .metadata file "
        rf"\(it holds step folders; use {saved[1]}\)",
    )


def test_unreadable_metadata(saved, tmp_path):
    with open(os.path.join(saved[1], DCP_METADATA), "wb") as f:
        f.write(b"not a pickle")
    expect_error(load_from(saved[1], tmp_path), rf"checkpoint {saved[1]} is unreadable: .metadata cannot be read")


def test_metadata_with_foreign_pickle_is_not_executed(saved, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(os.path.join(saved[1], DCP_METADATA), "wb") as f:
        pickle.dump(Evil(), f)
    msg = r"is unreadable: .metadata cannot be read \(UnpicklingError: forbidden global posix.system\)"
    expect_error(load_from(saved[1], tmp_path), msg)
    assert not marker.exists()


def test_metadata_reaching_functions_through_allowed_modules_is_refused(saved, tmp_path):
    module, name = b"torch.distributed.checkpoint.metadata", b"torch.load"  # a dotted name: torch.load
    data = b"\x80\x04\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name + b"\x93."
    with open(os.path.join(saved[1], DCP_METADATA), "wb") as f:
        f.write(data)
    msg = r"forbidden global torch.distributed.checkpoint.metadata.torch.load"
    expect_error(load_from(saved[1], tmp_path), msg)


def test_truncated_data_file(saved, tmp_path):
    data = os.path.join(saved[1], "__0_0.distcp")
    os.truncate(data, os.path.getsize(data) // 2)
    msg = rf"checkpoint {saved[1]} is truncated: __0_0.distcp has \d+ bytes but its metadata needs \d+"
    expect_error(load_from(saved[1], tmp_path), msg)


def test_tampered_data_file(saved, tmp_path):
    data = os.path.join(saved[1], "__0_0.distcp")
    flip_byte(data, os.path.getsize(data) // 2)
    msg = rf"checkpoint {saved[1]} was tampered with: __0_0.distcp does not match its checksum in {MANIFEST}"
    expect_error(load_from(saved[1], tmp_path), msg)


def test_tampered_manifest(saved, tmp_path):
    with open(os.path.join(saved[1], MANIFEST), "w") as f:
        f.write("{")
    expect_error(load_from(saved[1], tmp_path), rf"checkpoint {saved[1]} is unreadable: {MANIFEST} is damaged")


def test_unsafe_bytes_are_refused_without_a_manifest(tmp_path):
    """A pickled object that weights_only loading does not allow is an error, never unpickled."""
    run = Run(str(tmp_path / "src"), cfg())
    run.loader.state_dict = lambda: {"pos": 0, "obj": Custom()}
    run.train(2)
    path = str(tmp_path / "src" / "checkpoint" / "step-2")
    os.remove(os.path.join(path, MANIFEST))
    dst = load_from(path, tmp_path)
    dst.loader.state_dict = lambda: {"pos": 0, "obj": None}
    msg = rf"checkpoint {path} could not be loaded: UnpicklingError: Weights only load failed"
    with pytest.raises(ConfigError, match=msg):
        dst.ckpt.load()


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        (
            dict(width=16),
            r"shape mismatch \[0.bias: checkpoint \[8\] vs model \[16\], "
            r"0.weight: checkpoint \[8, 8\] vs model \[16, 16\], 1.bias: .*\] \(4 total\)",
        ),
        (dict(depth=3), r"missing keys \[2.bias, 2.weight\] \(2 total\)"),
        (dict(depth=1), r"unexpected keys \[1.bias, 1.weight\] \(2 total\)"),
    ],
)
def test_checkpoint_of_another_model(saved, tmp_path, shape, pattern):
    msg = rf"checkpoint {saved[1]} does not match this run: {pattern}; load it with the model and flavor that saved it"
    expect_error(load_from(saved[1], tmp_path, **shape), msg)


def test_model_only_checkpoint_as_full_initial_load(tmp_path):
    run = Run(str(tmp_path / "src"), cfg())
    run.train(2, last=2)
    path = str(tmp_path / "src" / "checkpoint" / "step-2")
    expect_error(
        load_from(path, tmp_path),
        rf"checkpoint {path} has no optimizer, lr_scheduler, dataloader, train_state state: add "
        "optimizer,lr_scheduler,dataloader,train_state to --checkpoint.exclude_from_loading, or load only the model",
    )


def test_state_shape_mismatch_is_found_before_loading(saved, tmp_path):
    dst = load_from(saved[1], tmp_path)
    dst.ts.rng = torch.zeros(3, dtype=torch.uint8)
    msg = r"does not match this run: shape mismatch \[train_state.rng: checkpoint \[\d+\] vs model \[3\]\]"
    with pytest.raises(ConfigError, match=msg):
        dst.ckpt.load()
