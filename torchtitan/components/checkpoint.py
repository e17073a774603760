"""CheckpointManager: DCP save/load of the whole training state, with exact resume.

Layout: `<base_folder>/<checkpoint.folder>/step-N/`, written as `step-N.tmp` and renamed once complete.
A full checkpoint holds the model FQNs at the top level plus "optimizer", "lr_scheduler",
"dataloader", "train_state" (and any other `states`). See docs/checkpoint.md.
"""

import os
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan.components.checkpoint_hf import load_hf, save_hf
from torchtitan.components.checkpoint_storage import (
    Comm,
    PlainTensorSavePlanner,
    commit,
    is_complete,
    is_hf_folder,
    load_dcp,
    prepare_write,
    read_dcp_metadata,
    remove_stale,
    write_dcp,
)
from torchtitan.config.errors import ConfigError
from torchtitan.distributed.parallel_dims import FLAGS as PARALLELISM_FLAGS
from torchtitan.protocols.state_dict_adapter import StateDictAdapter
from torchtitan.tools.logging import get_logger
from torchtitan.tools.utils import TORCH_DTYPES

logger = get_logger(__name__)

__all__ = ["CheckpointManager", "ModelWrapper", "validate_seed_checkpoint"]

ASYNC_MODES = ("disabled", "async", "async_with_pinned_mem")
_STEP_RE = re.compile(r"step-(\d+)")


class ModelWrapper(Stateful):
    """All model parts as one Stateful with plain FQN keys (via `get_model_state_dict`)."""

    def __init__(self, model_parts: list[nn.Module]) -> None:
        self.model_parts = model_parts

    def state_dict(self) -> dict[str, Any]:
        return {k: v for part in self.model_parts for k, v in get_model_state_dict(part).items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.model_parts:
            keys = get_model_state_dict(part).keys()
            set_model_state_dict(part, {k: state_dict[k] for k in keys}, options=StateDictOptions(strict=True))


def validate_seed_checkpoint(parallel_dims: Any) -> None:
    """ConfigError unless the run is one process with every parallel degree 1 (seed checkpoints must hold
    unsharded weights so that any later layout can load them)."""
    degrees = {flag: getattr(parallel_dims, field) for field, flag in PARALLELISM_FLAGS.items()}
    if parallel_dims.world_size != 1:
        raise ConfigError(
            f"checkpoint.create_seed_checkpoint needs one process, got world size {parallel_dims.world_size}: "
            "run it with NGPU=1 and all parallel degrees 1"
        )
    for key, value in degrees.items():
        if value != 1:
            raise ConfigError(f"checkpoint.create_seed_checkpoint needs {key}=1, got {value}: set it to 1")


class CheckpointManager:
    """Saves and loads the training state with torch.distributed.checkpoint (DCP).

    `states` must contain "train_state" (the trainer: step, tokens seen, RNG states); all states and the
    dataloader must return the same state dict on every rank (DCP stores one copy per key).
    """

    def __init__(
        self,
        dataloader: Stateful | None,
        model_parts: list[nn.Module],
        optimizers: Stateful | None,
        lr_schedulers: Stateful | None,
        states: dict[str, Stateful],
        checkpoint_config: Any,
        sd_adapter: StateDictAdapter | None,
        base_folder: str,
        hf_assets_path: str | None,
    ) -> None:
        self.config = cfg = checkpoint_config
        self.enable = cfg.enable or cfg.create_seed_checkpoint
        self.folder = os.path.join(base_folder, cfg.folder)
        self.model = ModelWrapper(model_parts)
        named = {"optimizer": optimizers, "lr_scheduler": lr_schedulers, "dataloader": dataloader, **states}
        self.states: dict[str, Stateful] = {k: v for k, v in named.items() if v is not None}
        self.sd_adapter = sd_adapter
        self.hf_assets_path = hf_assets_path
        self.async_mode = cfg.async_mode
        self._pending: Future | None = None  # finalization of the last async save
        self._staging: Future | None = None  # pinned-memory staging of the last async save
        self._stager: DefaultStager | None = None
        self._purger = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint_purge")
        self._finisher: ThreadPoolExecutor | None = None
        self._stale_removed = False
        if not self.enable:
            self.comm = Comm(None)
            return
        self._validate()
        # DCP's async saves run collectives from a background thread: they need a group of their own,
        # and a CPU (gloo) one; all checkpoint bookkeeping uses it so it never interleaves with training.
        self.comm = Comm(dist.new_group(backend="gloo") if dist.is_initialized() else None)
        if self.async_mode != "disabled":
            self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint_finish")
        if self.async_mode == "async_with_pinned_mem":
            if torch.cuda.is_available():
                self._stager = DefaultStager(StagingOptions(True, False, True, True))
            else:
                logger.warning(
                    "checkpoint.async_mode='async_with_pinned_mem' needs CUDA for pinned memory; "
                    "using 'async' (staging to CPU memory during save) instead"
                )

    def _validate(self) -> None:
        cfg = self.config
        if cfg.async_mode not in ASYNC_MODES:
            raise ConfigError(f"checkpoint.async_mode={cfg.async_mode!r} is invalid: use one of {list(ASYNC_MODES)}")
        if cfg.export_dtype not in TORCH_DTYPES:
            raise ConfigError(
                f"checkpoint.export_dtype={cfg.export_dtype!r} is invalid: use one of {list(TORCH_DTYPES)}"
            )
        if cfg.keep_latest_k == 1 or cfg.keep_latest_k < 0:
            raise ConfigError(
                f"checkpoint.keep_latest_k={cfg.keep_latest_k} is invalid: use 0 (keep all) or a value >= 2"
            )
        known = ["model", *self.states]
        unknown = [name for name in cfg.exclude_from_loading if name not in known]
        if unknown:
            raise ConfigError(
                f"checkpoint.exclude_from_loading={list(cfg.exclude_from_loading)} names unknown states {unknown}: "
                f"use names from {known}"
            )
        if cfg.last_save_in_hf and not cfg.last_save_model_only:
            raise ConfigError(
                "checkpoint.last_save_in_hf=true needs checkpoint.last_save_model_only=true "
                "(Hugging Face files hold only the model): drop --checkpoint.no_last_save_model_only"
            )
        if (cfg.last_save_in_hf or cfg.initial_load_in_hf) and self.sd_adapter is None:
            key = "last_save_in_hf" if cfg.last_save_in_hf else "initial_load_in_hf"
            raise ConfigError(
                f"checkpoint.{key}=true needs a model with a state-dict adapter, and this model has none: "
                f"set checkpoint.{key}=false"
            )

    # ---------------------------------------------------------------- saving

    def _should_save(self, step: int, last_step: bool) -> bool:
        cfg = self.config
        if not self.enable or cfg.load_only:
            return False
        if cfg.create_seed_checkpoint or step == 0:
            return cfg.create_seed_checkpoint and step == 0
        return last_step or step % cfg.interval == 0 or (step == 1 and cfg.enable_first_step_checkpoint)

    @torch.no_grad()
    def save(self, curr_step: int, last_step: bool = False) -> None:
        """Save after step `curr_step` when the policy asks for it (collective: call on every rank).

        With `create_seed_checkpoint`, `save(0)` is `save_seed()`.
        """
        if not self._should_save(curr_step, last_step):
            return
        cfg = self.config
        if cfg.create_seed_checkpoint:
            self.save_seed()
            return
        tmp, final = self._begin_write(curr_step)
        if last_step and cfg.last_save_model_only:
            dtype = TORCH_DTYPES[cfg.export_dtype]
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.model.state_dict().items()}
            if cfg.last_save_in_hf:
                save_hf(sd, self.sd_adapter, tmp, self.comm, self.hf_assets_path)
                commit(tmp, final, self.comm)
            else:
                write_dcp(sd, tmp, final, self.comm)
            fmt = "Hugging Face safetensors" if cfg.last_save_in_hf else "DCP"
            logger.info(f"Saved the model only in {cfg.export_dtype} ({fmt}) at the last step to {final}")
        elif self.async_mode == "disabled" or last_step:
            write_dcp(self._full_state(), tmp, final, self.comm)
            logger.info(f"Saved the full checkpoint of step {curr_step} to {final}")
        else:
            self._write_async(self._full_state(), tmp, final)
            logger.info(f"Saving the full checkpoint of step {curr_step} to {final} in the background")
            return
        self._purge()

    @torch.no_grad()
    def save_seed(self) -> None:
        """Write the seed checkpoint `step-0`: the model only, as initialized (one process, all degrees 1:
        see `validate_seed_checkpoint`). Any later run in any layout with this checkpoint folder loads it."""
        tmp, final = self._begin_write(0)
        write_dcp(self.model.state_dict(), tmp, final, self.comm)
        logger.info(f"Saved the seed checkpoint (model only, unsharded) to {final}")
        later = sorted(s for s in self._complete_steps() if s > 0)
        if later:
            logger.warning(f"{self.folder} also holds steps {later}: runs in it resume those, not the seed")

    def _begin_write(self, step: int) -> tuple[str, str]:
        """Wait for the previous save, clear leftovers of interrupted ones; returns (temporary, final) folder."""
        self._wait_pending()
        if not self._stale_removed:
            if self.comm.rank == 0:
                remove_stale(self.folder)
            self._stale_removed = True
        final = os.path.join(self.folder, f"step-{step}")
        return prepare_write(final, self.comm), final

    def _full_state(self) -> dict[str, Any]:
        return {**self.model.state_dict(), **{name: s.state_dict() for name, s in self.states.items()}}

    def _write_async(self, state: dict[str, Any], tmp: str, final: str) -> None:
        response = dcp.async_save(
            state,
            storage_writer=FileSystemWriter(tmp),
            planner=PlainTensorSavePlanner(),
            process_group=self.comm.group,
            async_stager=self._stager,
            no_dist=self.comm.no_dist,
        )
        if isinstance(response, AsyncSaveResponse):
            self._staging = response.staging_completion
            upload = response.upload_completion
        else:
            upload = response

        def finish() -> None:
            upload.result()
            commit(tmp, final, self.comm)
            self._purge()
            logger.info(f"Finished the background save to {final}")

        self._pending = self._finisher.submit(finish)

    def maybe_wait_for_staging(self) -> None:
        """Block until an async pinned-memory save has copied the state off the parameters; call this
        before `optimizers.step()` modifies them."""
        if self._staging is not None:
            self._staging.result()
            self._staging = None

    def _wait_pending(self) -> None:
        self.maybe_wait_for_staging()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _purge(self) -> None:
        k = self.config.keep_latest_k
        if k > 0 and self.comm.rank == 0:
            self._purger.submit(self._purge_now, k)

    def _purge_now(self, k: int) -> None:
        steps = sorted(self._complete_steps().items())
        for step, path in steps[:-k]:
            logger.info(f"Removing checkpoint step {step} ({path}) to keep the latest {k}")
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Finish pending background saves and purges and release their threads (call once at the end)."""
        try:
            self._wait_pending()
        finally:
            if self._finisher is not None:
                self._finisher.shutdown(wait=True)
            self._purger.shutdown(wait=True)
            if self._stager is not None:
                self._stager.close()

    # ---------------------------------------------------------------- loading

    def _complete_steps(self) -> dict[int, str]:
        steps = {}
        if os.path.isdir(self.folder):
            for entry in os.scandir(self.folder):
                match = _STEP_RE.fullmatch(entry.name)
                if match and entry.is_dir():
                    if is_complete(entry.path):
                        steps[int(match.group(1))] = entry.path
                    else:
                        logger.warning(f"Ignoring {entry.path}: it holds no complete checkpoint")
        return steps

    def load(self, step: int = -1) -> bool:
        """Load at start-up: the run's own latest complete step (or `step` / `checkpoint.load_step`), else
        `checkpoint.initial_load_path` (or Hugging Face weights with `initial_load_in_hf`).

        Returns True when something was loaded. Collective: call on every rank.
        """
        cfg = self.config
        if not self.enable:
            if cfg.initial_load_path:
                logger.warning("checkpoint.initial_load_path is set but checkpoint.enable is false: nothing is loaded")
            return False
        if cfg.create_seed_checkpoint:
            logger.info("Creating a seed checkpoint: nothing is loaded")
            return False
        step = cfg.load_step if step == -1 else step
        steps = self._complete_steps()
        if step != -1 and step not in steps:
            raise ConfigError(
                f"checkpoint.load_step={step}: {os.path.join(self.folder, f'step-{step}')} is not a complete "
                f"checkpoint; complete steps there: {sorted(steps)}; use one of them or -1 for the latest"
            )
        if step == -1 and steps:
            step = max(steps)
        if step != -1:
            if cfg.initial_load_path or cfg.initial_load_in_hf:
                logger.warning(f"Resuming from {self.folder}; checkpoint.initial_load_path/_in_hf is ignored")
            self._load_own_step(step, steps)
            return True
        if cfg.initial_load_in_hf:
            path = cfg.initial_load_path or self.hf_assets_path
            if not path:
                raise ConfigError(
                    "checkpoint.initial_load_in_hf=true but neither checkpoint.initial_load_path nor "
                    "model.hf_assets_path is set: set one to a folder with Hugging Face safetensors"
                )
            self.model.load_state_dict(load_hf(path, self.model.state_dict(), self.sd_adapter, self.comm))
            logger.info(f"Loaded the model from Hugging Face safetensors in {path}; nothing else was loaded")
            return True
        if cfg.initial_load_path:
            what = "initial checkpoint (model only)" if cfg.initial_load_model_only else "initial checkpoint"
            self._load_dcp(cfg.initial_load_path, cfg.initial_load_model_only, what)
            return True
        logger.info(f"No checkpoint in {self.folder} and no checkpoint.initial_load_path: training from scratch")
        return False

    def _load_own_step(self, step: int, steps: dict[int, str]) -> None:
        path = steps[step]
        model_only = is_hf_folder(path) or not self._holds_states(read_dcp_metadata(path))
        if model_only and step != 0:
            full = sorted(s for s, p in steps.items() if not is_hf_folder(p) and s != step)
            raise ConfigError(
                f"checkpoint {path} holds only model weights (the final export of checkpoint.last_save_model_only), "
                f"so training cannot resume from it: set --checkpoint.load_step to a full step (candidates {full}) "
                "or load it in a new run via --checkpoint.initial_load_path"
            )
        self._load_dcp(path, step == 0, "seed checkpoint (model only)" if step == 0 else f"checkpoint of step {step}")

    def _holds_states(self, metadata: Any) -> bool:
        return any(k.split(".", 1)[0] in self.states for k in metadata.state_dict_metadata)

    def _load_dcp(self, folder: str, model_only: bool, what: str) -> None:
        """Check `folder` completely, then load it (all ranks raise the same ConfigError on a problem)."""
        metadata = read_dcp_metadata(folder)
        exclude = set(self.config.exclude_from_loading)
        names = [] if model_only else [n for n in self.states if n not in exclude]
        saved = {k.split(".", 1)[0] for k in metadata.state_dict_metadata}
        absent = [n for n in names if n not in saved]
        if absent:
            raise ConfigError(
                f"checkpoint {folder} has no {', '.join(absent)} state: add {','.join(absent)} to "
                "--checkpoint.exclude_from_loading, or load only the model"
            )
        model_sd = self.model.state_dict() if "model" not in exclude else {}
        state: dict[str, Any] = {**model_sd, **{n: self.states[n].state_dict() for n in names}}
        load_dcp(folder, state, self.comm, set(model_sd) if model_sd else None, tuple(self.states), metadata)
        if model_sd:
            self.model.load_state_dict({k: state[k] for k in model_sd})
        for name in names:
            self.states[name].load_state_dict(state[name])
        loaded = ([f"model ({len(model_sd)} tensors)"] if model_sd else []) + names
        skipped = [n for n in self.states if n not in names]
        reason = "model-only load" if model_only else "checkpoint.exclude_from_loading"
        note = f"; not loaded ({reason}): {', '.join(skipped)}" if skipped else ""
        logger.info(f"Loaded {what} from {folder}: {', '.join(loaded)}{note}")
