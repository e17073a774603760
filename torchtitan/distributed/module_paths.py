"""Find a model's parts by dotted path, so the parallel helpers serve our models and Hugging Face's alike.

A path names an attribute chain (`tok_embeddings`, `model.layers`). An attribute that does not exist is
an error (a wrong path must not silently skip a parallelism); one that is None is absent on purpose
(pipeline parallelism removes the modules a stage does not run) and is skipped.
"""

from __future__ import annotations

import torch.nn as nn


def resolve_module(model: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted `path` under `model`; None when a module on the path was set to None.

    Raises AttributeError naming the path when an attribute on it does not exist."""
    module: nn.Module | None = model
    for part in path.split("."):
        if module is None:
            return None
        if not hasattr(module, part):
            raise AttributeError(f"{type(model).__name__} has no module at {path!r} (no attribute {part!r})")
        module = getattr(module, part)
    return module


def present_modules(model: nn.Module, paths: tuple[str, ...] | list[str]) -> list[nn.Module]:
    """The modules at `paths` that are present (not None), in order; a path that does not exist raises."""
    return [m for m in (resolve_module(model, p) for p in paths) if m is not None]


def block_container(model: nn.Module, path: str) -> nn.ModuleDict | nn.ModuleList:
    """The container of the repeated blocks (a ModuleDict or ModuleList) at `path`."""
    blocks = resolve_module(model, path)
    if not isinstance(blocks, (nn.ModuleDict, nn.ModuleList)):
        raise TypeError(f"{path!r} of {type(model).__name__} is {type(blocks).__name__}, not a ModuleDict/ModuleList")
    return blocks


def set_module(model: nn.Module, path: str, module: nn.Module | None) -> None:
    """Put `module` (or None) at dotted `path` under `model`."""
    owner, _, name = path.rpartition(".")
    setattr(resolve_module(model, owner) if owner else model, name, module)


def stage_modules(model: nn.Module, blocks_path: str) -> list[str]:
    """Paths of the modules a pipeline stage holds or drops besides the blocks: the children of the root and
    of each module on the way to the block container (e.g. `lm_head`, `model.embed_tokens`, `model.norm` for
    `model.layers`), except those without parameters (e.g. a rotary embedding), which every stage keeps."""
    names, parent, prefix = [], model, ""
    for step in blocks_path.split("."):
        for name, child in parent.named_children():
            if name != step and child is not None and any(True for _ in child.parameters()):
                names.append(prefix + name)
        parent, prefix = getattr(parent, step), f"{prefix}{step}."
    return names
