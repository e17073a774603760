"""Accelerator checkpoints: DCP save/load of models, optimizers, schedulers, dataloaders and RNG (resharded
on load, so another layout can resume), and full-weight safetensors export."""

from __future__ import annotations

import os
import pickle
import random
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from torchtitan.config.errors import ConfigError

if TYPE_CHECKING:
    from torchtitan.accelerate.accelerator import Accelerator


def _owned_optimizers(accelerator: Accelerator, model: nn.Module) -> list[Any]:
    params = {id(p) for p in model.parameters()}
    return [
        o.optimizer
        for o in accelerator._optimizers
        if all(id(p) in params for g in o.optimizer.param_groups for p in g["params"])
    ]


def _pickled(obj: Any) -> torch.Tensor:
    """A Python object as a uint8 tensor (identical on every rank, so DCP stores it once)."""
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _unpickled(t: torch.Tensor) -> Any:
    return pickle.loads(t.numpy().tobytes())


def _state(accelerator: Accelerator) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for i, model in enumerate(accelerator._models):
        model_sd, optim_sd = get_state_dict(model, _owned_optimizers(accelerator, model))
        state[f"model_{i}"] = model_sd
        state[f"optimizer_{i}"] = optim_sd
    return state


def _extras(accelerator: Accelerator) -> dict[str, Any]:
    """Schedulers, dataloader positions, the accumulation counter and RNG: global, identical on all ranks."""
    return {
        "schedulers": [s.scheduler.state_dict() for s in accelerator._schedulers],
        "dataloaders": [d.state_dict() for d in accelerator._dataloaders],
        "microstep": accelerator._microstep,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
    }


def save_state(accelerator: Accelerator, output_dir: str) -> None:
    """DCP checkpoint of everything `prepare()` returned, plus RNG, in `output_dir`."""
    state = _state(accelerator)
    extras = _extras(accelerator)
    state["extras"] = _pickled(extras)
    dcp.save(state, checkpoint_id=output_dir)
    accelerator.wait_for_everyone()


def load_state(accelerator: Accelerator, input_dir: str) -> None:
    """Restore a `save_state` checkpoint into the prepared objects (resharding to this run's layout)."""
    if not os.path.isdir(input_dir):
        raise ConfigError(f"load_state({input_dir!r}): no such checkpoint folder; pass a save_state() output folder")
    state = _state(accelerator)
    meta = dcp.FileSystemReader(input_dir).read_metadata()
    size = meta.state_dict_metadata["extras"].size[0]
    state["extras"] = torch.empty(size, dtype=torch.uint8)
    dcp.load(state, checkpoint_id=input_dir)
    for i, model in enumerate(accelerator._models):
        set_state_dict(
            model,
            _owned_optimizers(accelerator, model),
            model_state_dict=state[f"model_{i}"],
            optim_state_dict=state[f"optimizer_{i}"],
        )
    extras = _unpickled(state["extras"])
    if len(extras["schedulers"]) != len(accelerator._schedulers) or len(extras["dataloaders"]) != len(
        accelerator._dataloaders
    ):
        raise ConfigError(
            f"load_state({input_dir!r}): it holds {len(extras['schedulers'])} scheduler(s) and "
            f"{len(extras['dataloaders'])} dataloader(s), this run prepared {len(accelerator._schedulers)} and "
            f"{len(accelerator._dataloaders)}; prepare the same objects as the run that saved it"
        )
    for sched, sd in zip(accelerator._schedulers, extras["schedulers"]):
        sched.scheduler.load_state_dict(sd)
    for loader, sd in zip(accelerator._dataloaders, extras["dataloaders"]):
        loader.load_state_dict(sd)
    accelerator._microstep = extras["microstep"]
    torch.set_rng_state(extras["torch_rng"])
    if extras["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extras["cuda_rng"])
    random.setstate(extras["python_rng"])


def save_model(model: nn.Module, save_directory: str) -> None:
    """Full (unsharded) weights as `model.safetensors` in `save_directory`, plus the transformers
    config (`config.json`) when the model has one; written by rank 0, all ranks must call it."""
    from safetensors.torch import save_file

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(save_directory, exist_ok=True)
        # clone: tied weights would share storage, which safetensors refuses
        save_file({k: v.detach().clone().contiguous() for k, v in full.items()},
                  os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(save_directory)
    if dist.is_initialized():
        dist.barrier()
