"""CheckpointManager on one process: round trips, save policy, crash safety, exports, async modes."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from torchtitan.components.checkpoint import CheckpointManager, validate_seed_checkpoint
from torchtitan.components.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config import ConfigError
from torchtitan.config.job_config import Checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Loader:
    """Dataloader-like Stateful whose state is a global window position (as the real one)."""

    def __init__(self) -> None:
        self.pos = 0

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "meta": {"name": "shakespeare", "epochs": [0, 1]}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.pos = sd["pos"]


class TrainState:
    """Trainer-like Stateful: step, tokens seen and the CPU RNG state."""

    def __init__(self) -> None:
        self.step, self.ntokens_seen, self.rng = 0, 0, torch.get_rng_state()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen, "rng": self.rng}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step, self.ntokens_seen, self.rng = sd["step"], sd["ntokens_seen"], sd["rng"].clone()


def tiny_model(width: int = 8, depth: int = 2) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


@dataclass
class Run:
    """A tiny training setup plus its CheckpointManager (a stack of Linears unless `model_fn` is given)."""

    folder: str
    cfg: Checkpoint
    width: int = 8
    depth: int = 2
    seed: int = 0
    model_fn: Callable[[], nn.Module] | None = None
    batch_fn: Callable[[torch.Generator], torch.Tensor] | None = None
    sd_adapter: Any = None
    hf_assets_path: str | None = None

    def __post_init__(self) -> None:
        torch.manual_seed(self.seed)
        self.model = self.model_fn() if self.model_fn else tiny_model(self.width, self.depth)
        self.opt = OptimizersContainer([self.model], torch.optim.AdamW, {"lr": 0.01})
        self.sched = LRSchedulersContainer(self.opt, lambda s: 1.0 / (s + 1))
        self.loader, self.ts = Loader(), TrainState()
        states = {"train_state": self.ts}
        self.ckpt = CheckpointManager(
            self.loader, [self.model], self.opt, self.sched, states, self.cfg, self.sd_adapter, self.folder,
            self.hf_assets_path,
        )

    def batch(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step)
        return self.batch_fn(gen) if self.batch_fn else torch.randn(4, self.width, generator=gen)

    def train(self, steps: int, save: bool = True, last: int | None = None) -> None:
        for _ in range(steps):
            step = self.ts.step + 1
            self.model(self.batch(step)).float().pow(2).mean().backward()
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad()
            self.loader.pos += 4
            self.ts.step, self.ts.ntokens_seen = step, self.ts.ntokens_seen + 4
            if save:
                self.ckpt.save(step, last_step=step == last)


def cfg(**kw: Any) -> Checkpoint:
    return Checkpoint(**{"enable": True, "interval": 2, **kw})


def steps_in(folder: str) -> list[str]:
    return sorted(os.listdir(os.path.join(folder, "checkpoint")))


def read_folder(path: str) -> dict[str, Any]:
    """Every entry of a DCP folder, flattened (test-only: trusts the pickles)."""
    sd: dict[str, Any] = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return flatten_state_dict(sd)[0]


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def test_round_trip_restores_every_state(tmp_path):
    a = Run(str(tmp_path), cfg())
    assert a.ckpt.load() is False
    a.train(4)
    a.ckpt.close()
    assert steps_in(str(tmp_path)) == ["step-2", "step-4"]
    assert sorted(os.listdir(tmp_path / "checkpoint" / "step-4")) == [".checksums.json", ".metadata", "__0_0.distcp"]

    b = Run(str(tmp_path), cfg(), seed=1)
    assert b.ckpt.load() is True
    assert_same(b.model.state_dict(), a.model.state_dict())
    assert_same(b.opt.state_dict(), a.opt.state_dict())
    assert_same(b.sched.state_dict(), a.sched.state_dict())
    assert (b.loader.pos, b.ts.step, b.ts.ntokens_seen) == (16, 4, 16)
    assert torch.equal(b.ts.rng, a.ts.rng)
    # resumed training continues exactly like the uninterrupted run
    a.train(2, save=False)
    b.train(2, save=False)
    assert_same(b.model.state_dict(), a.model.state_dict())


def test_model_fqns_are_top_level_and_states_are_namespaced(tmp_path):
    run = Run(str(tmp_path), cfg())
    run.train(2)
    keys = set(read_folder(str(tmp_path / "checkpoint" / "step-2")))
    assert {"0.weight", "0.bias", "1.weight", "1.bias"} <= keys
    assert {"dataloader.pos", "train_state.step", "train_state.rng", "lr_scheduler.last_epoch"} <= keys
    assert "optimizer.state.0.weight.exp_avg" in keys


def test_save_policy_interval_first_step_and_last_step(tmp_path):
    run = Run(str(tmp_path / "a"), cfg(interval=3, enable_first_step_checkpoint=True, last_save_model_only=False))
    run.train(7, last=7)
    assert steps_in(run.folder) == ["step-1", "step-3", "step-6", "step-7"]
    off = Run(str(tmp_path / "b"), cfg(enable=False))
    off.train(4)
    assert not os.path.exists(tmp_path / "b" / "checkpoint")


def test_load_only_never_saves_but_loads(tmp_path):
    Run(str(tmp_path), cfg()).train(2)
    run = Run(str(tmp_path), cfg(load_only=True))
    assert run.ckpt.load() and run.ts.step == 2
    run.train(4, last=6)
    run.ckpt.close()
    assert steps_in(str(tmp_path)) == ["step-2"]


def test_keep_latest_k_purges_older_steps(tmp_path):
    run = Run(str(tmp_path), cfg(keep_latest_k=2))
    run.train(8)
    run.ckpt.close()
    assert steps_in(str(tmp_path)) == ["step-6", "step-8"]
    keep_all = Run(str(tmp_path / "all"), cfg(keep_latest_k=0))
    keep_all.train(8)
    keep_all.ckpt.close()
    assert steps_in(keep_all.folder) == ["step-2", "step-4", "step-6", "step-8"]


def test_load_step_picks_an_older_step(tmp_path):
    first = Run(str(tmp_path), cfg())
    first.train(2)
    weights_at_2 = {k: v.clone() for k, v in first.model.state_dict().items()}
    first.train(2)
    run = Run(str(tmp_path), cfg(load_step=2), seed=1)
    assert run.ckpt.load() and run.ts.step == 2
    assert_same(run.model.state_dict(), weights_at_2)
    msg = r"checkpoint.load_step=3: .*step-3 is not a complete checkpoint; complete steps there: \[2, 4\]"
    with pytest.raises(ConfigError, match=msg):
        Run(str(tmp_path), cfg(load_step=3)).ckpt.load()


def test_exclude_from_loading_keeps_the_fresh_states(tmp_path):
    Run(str(tmp_path), cfg()).train(2)
    run = Run(str(tmp_path), cfg(exclude_from_loading=["optimizer", "lr_scheduler", "dataloader"]), seed=1)
    fresh_opt = run.opt.state_dict()
    assert run.ckpt.load()
    assert run.ts.step == 2 and run.loader.pos == 0 and run.sched.state_dict()["last_epoch"] == 0
    assert_same(run.opt.state_dict(), fresh_opt)
    msg = r"exclude_from_loading=\['optimizers'\] names unknown states \['optimizers'\]"
    with pytest.raises(ConfigError, match=msg):
        Run(str(tmp_path), cfg(exclude_from_loading=["optimizers"]))


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="keep_latest_k=1 is invalid: use 0 .keep all. or a value >= 2"):
        Run(str(tmp_path), cfg(keep_latest_k=1))
    with pytest.raises(ConfigError, match="last_save_in_hf=true needs checkpoint.last_save_model_only=true"):
        Run(str(tmp_path), cfg(last_save_in_hf=True, last_save_model_only=False))
    with pytest.raises(ConfigError, match="last_save_in_hf=true needs a model with a state-dict adapter"):
        Run(str(tmp_path), cfg(last_save_in_hf=True))


def test_crash_inside_the_write_keeps_the_previous_step(tmp_path, monkeypatch):
    run = Run(str(tmp_path), cfg())
    run.train(2)
    import torch.distributed.checkpoint.filesystem as fs

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash inside the write")

    monkeypatch.setattr(fs, "_write_item", crash)
    with pytest.raises(CheckpointException, match="simulated crash"):
        run.train(2)
    monkeypatch.undo()
    assert steps_in(str(tmp_path)) == ["step-2", "step-4.tmp"]
    resumed = Run(str(tmp_path), cfg(), seed=1)
    assert resumed.ckpt.load() and resumed.ts.step == 2
    resumed.train(2)  # the next save removes the stale temporary folder
    assert steps_in(str(tmp_path)) == ["step-2", "step-4"]


def test_kill_before_commit_leaves_no_step_folder(tmp_path):
    """SIGKILL while a save sits between writing its files and renaming its folder (the manifest write
    just before the rename is made to sleep)."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        from tests.unit_tests.test_checkpoint import Run, cfg
        from torchtitan.components import checkpoint_storage
        run = Run({str(tmp_path)!r}, cfg())
        run.train(2)
        print("saved", flush=True)
        write_synced = checkpoint_storage._write_synced
        checkpoint_storage._write_synced = lambda *args: (time.sleep(60), write_synced(*args))
        run.train(2)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    tmp_step = tmp_path / "checkpoint" / "step-4.tmp"
    for _ in range(600):
        if (tmp_step / ".metadata").exists():
            break
        proc.poll()
        assert proc.returncode is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert steps_in(str(tmp_path)) == ["step-2", "step-4.tmp"]
    resumed = Run(str(tmp_path), cfg(), seed=1)
    assert resumed.ckpt.load() and resumed.ts.step == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_last_save_model_only_in_export_dtype(tmp_path, dtype):
    run = Run(str(tmp_path), cfg(export_dtype=dtype))
    run.train(3, last=3)
    run.ckpt.close()
    saved = read_folder(str(tmp_path / "checkpoint" / "step-3"))
    assert sorted(saved) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert {v.dtype for v in saved.values()} == {getattr(torch, dtype)}
    assert torch.equal(saved["0.weight"], run.model[0].weight.detach().to(getattr(torch, dtype)))
    metadata = FileSystemReader(str(tmp_path / "checkpoint" / "step-3")).read_metadata()
    assert {md.properties.dtype for md in metadata.state_dict_metadata.values()} == {getattr(torch, dtype)}


def test_resuming_from_a_model_only_final_step_is_refused(tmp_path):
    Run(str(tmp_path), cfg()).train(3, last=3)
    msg = r"step-3 holds only model weights .* set --checkpoint.load_step to a full step \(candidates \[2\]\)"
    with pytest.raises(ConfigError, match=msg):
        Run(str(tmp_path), cfg()).ckpt.load()


def test_initial_load_path_model_only_and_full(tmp_path):
    src = Run(str(tmp_path / "src"), cfg())
    src.train(2)
    path = str(tmp_path / "src" / "checkpoint" / "step-2")
    run = Run(str(tmp_path / "new"), cfg(initial_load_path=path), seed=1)
    assert run.ckpt.load()
    assert_same(run.model.state_dict(), src.model.state_dict())
    assert run.ts.step == 0 and run.loader.pos == 0
    full = Run(str(tmp_path / "full"), cfg(initial_load_path=path, initial_load_model_only=False), seed=1)
    assert full.ckpt.load() and full.ts.step == 2 and full.loader.pos == 8
    assert_same(full.opt.state_dict(), src.opt.state_dict())
    # the run's own checkpoint wins over initial_load_path
    full.train(2)
    again = Run(str(tmp_path / "full"), cfg(initial_load_path=path), seed=1)
    assert again.ckpt.load() and again.ts.step == 4


def test_seed_checkpoint_is_model_only_and_loads_as_start(tmp_path):
    seed = Run(str(tmp_path), cfg(create_seed_checkpoint=True, enable=False), seed=3)
    assert seed.ckpt.load() is False
    seed.ckpt.save_seed()
    assert steps_in(str(tmp_path)) == ["step-0"]
    seed.ckpt.save(1)  # nothing but step 0 is saved while creating a seed
    assert steps_in(str(tmp_path)) == ["step-0"]
    assert sorted(read_folder(str(tmp_path / "checkpoint" / "step-0"))) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    run = Run(str(tmp_path), cfg(), seed=4)
    assert run.ckpt.load() and run.ts.step == 0
    assert_same(run.model.state_dict(), seed.model.state_dict())


def test_validate_seed_checkpoint():
    @dataclass
    class Dims:
        world_size: int = 1
        dp_replicate: int = 1
        dp_shard: int = 1
        cp: int = 1
        tp: int = 1
        pp: int = 1
        ep: int = 1
        etp: int = 1

    validate_seed_checkpoint(Dims())
    with pytest.raises(ConfigError, match="needs parallelism.tensor_parallel_degree=1, got 2: set it to 1"):
        validate_seed_checkpoint(Dims(tp=2))
    with pytest.raises(ConfigError, match="needs one process, got world size 2"):
        validate_seed_checkpoint(Dims(world_size=2, dp_shard=2))


@pytest.mark.parametrize("mode", ["async", "async_with_pinned_mem"])
def test_async_modes_write_identical_files(tmp_path, mode):
    sync = Run(str(tmp_path / "sync"), cfg())
    sync.train(4)
    run = Run(str(tmp_path / mode), cfg(async_mode=mode))
    run.train(4)
    run.ckpt.close()
    for step in ("step-2", "step-4"):
        got = read_folder(os.path.join(run.folder, "checkpoint", step))
        assert_same(got, read_folder(os.path.join(sync.folder, "checkpoint", step)))


def test_async_save_snapshots_the_state_when_called(tmp_path):
    run = Run(str(tmp_path), cfg(async_mode="async"))
    run.train(2)
    expected = {k: v.clone() for k, v in run.model.state_dict().items()}
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(1.0)  # what the next optimizer step would do while the write is in flight
    run.ckpt.maybe_wait_for_staging()
    run.ckpt.close()
    saved = read_folder(str(tmp_path / "checkpoint" / "step-2"))
    assert_same({k: saved[k] for k in expected}, expected)
