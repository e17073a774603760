"""Safe, crash-proof storage for DCP checkpoint folders.

Used by `CheckpointManager` and the conversion scripts:
- folders are written under a temporary name and renamed once complete (with a checksum manifest);
- loading never unpickles arbitrary objects (restricted `.metadata` unpickler, `weights_only` bytes);
- a folder is checked (existence, metadata, truncation, checksums, keys and shapes) before anything is
  loaded, so a bad folder raises one `ConfigError` line instead of a partial load.
"""

import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem, WriteItem
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from torchtitan.config.errors import ConfigError
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

DCP_METADATA = ".metadata"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
MANIFEST = ".checksums.json"
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
# Top-level names of the non-model states of a full training checkpoint.
TRAINING_STATES = ("optimizer", "lr_scheduler", "dataloader", "train_state")
_CHUNK = 8 << 20

# DCP warns on every single-process save/load, even when no_dist=True is passed on purpose.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class Comm:
    """Collectives for checkpoint bookkeeping over an optional process group (None: one process)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1

    @property
    def no_dist(self) -> bool:
        return self.group is None

    def all_gather(self, obj: Any) -> list[Any]:
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def raise_if_any(self, problems: list[str]) -> None:
        """Raise the same ConfigError on every rank when any rank found a problem."""
        found = [p for rank_problems in self.all_gather(problems) for p in rank_problems]
        if found:
            more = f" (and {len(found) - 1} more problems)" if len(found) > 1 else ""
            raise ConfigError(found[0] + more)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP `.metadata` files, refusing every global that DCP metadata does not use."""

    _ALLOWED = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch.distributed.checkpoint.metadata" and "." not in name:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:  # its own classes, not its imports
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` unpickling only admits DCP metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"not DCP metadata but {type(metadata).__name__}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that loads non-tensor values with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class PlainTensorSavePlanner(DefaultSavePlanner):
    """DefaultSavePlanner that writes a tensor subclass (e.g. torchao's float8 FSDP weight wrapper) as a
    plain tensor of its values: DCP pickles each tensor, and a pickled subclass would only load
    (`weights_only`) where its library is imported and allowlisted, so not in a bf16 or fp32 run."""

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        data = super().resolve_data(write_item)
        if not (isinstance(data, torch.Tensor) and is_traceable_wrapper_subclass(data)):
            return data
        plain = torch.empty(data.shape, dtype=data.dtype, device=data.device)
        plain.copy_(data)  # the subclass's copy_ writes its values into `plain` (it returns a wrapper)
        return plain


# What dcp.load raises: CheckpointException (a BaseException) wraps the ranks' errors.
LOAD_ERRORS = (Exception, CheckpointException)


def describe_error(e: BaseException) -> str:
    """One line naming the root error of a DCP failure."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def is_complete(folder: str) -> bool:
    """True when `folder` holds a finished DCP or Hugging Face checkpoint."""
    return any(os.path.isfile(os.path.join(folder, m)) for m in (DCP_METADATA, HF_INDEX, HF_SINGLE))


def is_hf_folder(folder: str) -> bool:
    return not os.path.isfile(os.path.join(folder, DCP_METADATA)) and is_complete(folder)


def read_dcp_metadata(folder: str) -> Metadata:
    """Read a DCP folder's metadata; ConfigError when the folder is missing, incomplete or unreadable."""
    if not os.path.isdir(folder):
        raise ConfigError(f"checkpoint folder {folder} does not exist: point the load path at an existing step folder")
    path = os.path.join(folder, DCP_METADATA)
    if not os.path.isfile(path):
        hint = ""
        steps = sorted(p.name for p in Path(folder).glob("step-*") if is_complete(str(p)))
        if steps:
            hint = f" (it holds step folders; use {os.path.join(folder, steps[-1])})"
        raise ConfigError(
            f"checkpoint folder {folder} is incomplete or not a DCP checkpoint: no {DCP_METADATA} file{hint}; "
            "point the load path at a complete step folder"
        )
    try:
        return SafeFileSystemReader(folder).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError) as e:
        raise ConfigError(
            f"checkpoint {folder} is unreadable: {DCP_METADATA} cannot be read ({type(e).__name__}: {e}); "
            "the file is damaged or was not written by torch.distributed.checkpoint: load another step folder"
        ) from e


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _list_files(folder: str) -> list[str]:
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def verify_files(folder: str, metadata: Metadata | None, comm: Comm) -> None:
    """Check the folder's files against its metadata (truncation) and checksum manifest (tampering).

    Hashing is split over the ranks; every rank raises the same ConfigError on a problem.
    """
    problems: list[str] = []
    needed: dict[str, int] = {}
    if metadata is not None:
        for info in (metadata.storage_data or {}).values():
            rel = getattr(info, "relative_path", None)
            if rel is not None:
                needed[rel] = max(needed.get(rel, 0), info.offset + info.length)
    for rel, size in sorted(needed.items()):
        path = os.path.join(folder, rel)
        have = os.path.getsize(path) if os.path.isfile(path) else None
        if have is None or have < size:
            state = "is missing" if have is None else f"has {have} bytes but its metadata needs {size}"
            problems.append(
                f"checkpoint {folder} is truncated: {rel} {state}; the save did not finish or the file was cut: "
                "delete this folder or load another step"
            )
            break
    manifest_path = os.path.join(folder, MANIFEST)
    if not problems and os.path.isfile(manifest_path):
        problems += _check_manifest(folder, manifest_path, needed, comm)
    comm.raise_if_any(problems)


def _check_manifest(folder: str, manifest_path: str, needed: dict[str, int], comm: Comm) -> list[str]:
    fix = "the folder was modified after it was saved: restore it or load another step"
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
        expected = {rel: (int(v["size"]), str(v["sha256"])) for rel, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"checkpoint {folder} is unreadable: {MANIFEST} is damaged ({type(e).__name__}); {fix}"]
    unlisted = sorted(set(needed) - set(expected))
    if unlisted:
        return [f"checkpoint {folder} was tampered with: {unlisted[0]} is not in {MANIFEST}; {fix}"]
    for i, rel in enumerate(sorted(expected)):
        if i % comm.world != comm.rank:
            continue
        path = os.path.join(folder, rel)
        size, digest = expected[rel]
        if not os.path.isfile(path) or os.path.getsize(path) != size or _sha256(path) != digest:
            return [f"checkpoint {folder} was tampered with: {rel} does not match its checksum in {MANIFEST}; {fix}"]
    return []


def check_state_keys(
    folder: str,
    state: dict[str, Any],
    metadata: Metadata,
    comm: Comm,
    model_keys: set[str] | None = None,
    state_names: tuple[str, ...] = (),
    fix: str = "load it with the model and flavor that saved it",
) -> None:
    """ConfigError (same on every rank) unless every entry of `state` is in the checkpoint with its shape.

    `model_keys` are this rank's model FQNs; checkpoint keys that no rank expects and that do not belong
    to one of `state_names` (the non-model states such as "optimizer") are reported as unexpected.
    """
    flat, _ = flatten_state_dict(state)
    ckpt = metadata.state_dict_metadata
    unexpected: list[str] = []
    groups = [flat]
    if model_keys is not None:
        expected = set().union(*comm.all_gather(sorted(model_keys)))
        unexpected = sorted(k for k in ckpt if k not in expected and k.split(".", 1)[0] not in state_names)
        # A model problem also shows up in the optimizer's keys: report the model's first.
        groups = [{k: v for k, v in flat.items() if k in model_keys}]
        groups.append({k: v for k, v in flat.items() if k not in model_keys})
    problems = []
    for group in groups:
        missing, mismatched = _diff(group, ckpt)
        found = [("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)]
        parts = [f"{label} {_short(keys)}" for label, keys in found if keys]
        unexpected = []
        if parts:
            problems.append(f"checkpoint {folder} does not match this run: {'; '.join(parts)}; {fix}")
            break
    comm.raise_if_any(problems)


def _diff(flat: dict[str, Any], ckpt: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Keys of `flat` absent from the checkpoint metadata, and those whose shape or kind differs."""
    missing, mismatched = [], []
    for key, value in sorted(flat.items()):
        md = ckpt.get(key)
        if md is None:
            missing.append(key)
        elif isinstance(value, torch.Tensor):
            if not isinstance(md, TensorStorageMetadata):
                mismatched.append(f"{key}: checkpoint holds a non-tensor value, the run a tensor")
            elif tuple(md.size) != tuple(value.shape):
                mismatched.append(f"{key}: checkpoint {list(md.size)} vs model {list(value.shape)}")
        elif not isinstance(md, BytesStorageMetadata):
            mismatched.append(f"{key}: checkpoint holds a tensor, the run a {type(value).__name__}")
    return missing, mismatched


def load_dcp(
    folder: str,
    state: dict[str, Any],
    comm: Comm,
    model_keys: set[str] | None,
    state_names: tuple[str, ...],
    metadata: Metadata | None = None,
) -> None:
    """Check `folder` completely (files, checksums, keys, shapes), then load it into `state` in place.

    Every rank raises the same one-line ConfigError on a problem, before anything is loaded.
    """
    metadata = metadata or read_dcp_metadata(folder)
    verify_files(folder, metadata, comm)
    check_state_keys(folder, state, metadata, comm, model_keys, state_names)
    try:
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(folder),
            planner=SafeLoadPlanner(),
            process_group=comm.group,
            no_dist=comm.no_dist,
        )
    except LOAD_ERRORS as e:
        raise ConfigError(f"checkpoint {folder} could not be loaded: {describe_error(e)}") from e


def write_dcp(state: dict[str, Any], tmp: str, final: str, comm: Comm) -> None:
    """Save `state` into the temporary folder `tmp` (see `prepare_write`) and commit it as `final`."""
    dcp.save(state, storage_writer=FileSystemWriter(tmp), planner=PlainTensorSavePlanner(), process_group=comm.group,
             no_dist=comm.no_dist)
    commit(tmp, final, comm)


def _short(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} total)"


def temp_path(final: str) -> str:
    return final.rstrip("/") + TMP_SUFFIX


def prepare_write(final: str, comm: Comm) -> str:
    """Create an empty temporary folder for writing `final`; returns its path (all ranks)."""
    tmp = temp_path(final)
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    comm.barrier()
    return tmp


def commit(tmp: str, final: str, comm: Comm) -> None:
    """Checksum the finished files of `tmp` (split over ranks), then rank 0 writes the manifest and renames
    `tmp` to `final` atomically (replacing an older `final`). Collective."""
    files = _list_files(tmp)
    mine = {
        rel: {"size": os.path.getsize(os.path.join(tmp, rel)), "sha256": _sha256(os.path.join(tmp, rel))}
        for i, rel in enumerate(files)
        if i % comm.world == comm.rank
    }
    gathered = comm.all_gather(mine)
    if comm.rank == 0:
        if not is_complete(tmp):
            raise RuntimeError(f"checkpoint write to {tmp} finished without {DCP_METADATA} or {HF_INDEX}")
        manifest = {"algorithm": "sha256", "files": {k: v for part in gathered for k, v in part.items()}}
        _write_synced(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
        old = final.rstrip("/") + OLD_SUFFIX
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(os.path.dirname(os.path.abspath(final)))
        shutil.rmtree(old, ignore_errors=True)
    comm.barrier()


def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale(folder: str) -> None:
    """Remove temporary folders left in `folder` by interrupted saves (rank 0, before writing)."""
    if not os.path.isdir(folder):
        return
    for entry in os.scandir(folder):
        if entry.is_dir() and entry.name.startswith("step-") and entry.name.endswith((TMP_SUFFIX, OLD_SUFFIX)):
            logger.warning(f"Removing {entry.path}, left behind by an interrupted checkpoint save")
            shutil.rmtree(entry.path, ignore_errors=True)
