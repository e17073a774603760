"""Hugging Face safetensors export and import through DCP and a model's state-dict adapter, and the
DCP <-> HF conversions behind scripts/checkpoint_conversion/."""

import json
import os
import shutil

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from torchtitan.components.checkpoint_storage import (
    HF_INDEX,
    HF_SINGLE,
    LOAD_ERRORS,
    TRAINING_STATES,
    Comm,
    PlainTensorSavePlanner,
    SafeLoadPlanner,
    check_state_keys,
    commit,
    describe_error,
    load_dcp,
    prepare_write,
    read_dcp_metadata,
    verify_files,
    write_dcp,
)
from torchtitan.config.errors import ConfigError
from torchtitan.config.job_config import JobConfig
from torchtitan.protocols.model import BaseModelArgs
from torchtitan.protocols.state_dict_adapter import StateDictAdapter
from torchtitan.protocols.train_spec import TrainSpec, build_meta_model, get_train_spec

# Same default as transformers' `save_pretrained(max_shard_size="5GB")`.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)
_SHARDED_DIR = "sharded"  # where DCP's HF writer puts per-rank files before consolidating


def shard_index(sizes: dict[str, int], max_shard_bytes: int) -> dict[str, int]:
    """Map each HF key (in the given, module order) to a 1-based file index; a file is closed before it
    would exceed `max_shard_bytes`."""
    mapping, index, used = {}, 1, 0
    for key in sizes:
        if used and used + sizes[key] > max_shard_bytes:
            index, used = index + 1, 0
        mapping[key] = index
        used += sizes[key]
    return mapping


def save_hf(
    model_sd: dict[str, torch.Tensor],
    sd_adapter: StateDictAdapter,
    folder: str,
    comm: Comm,
    hf_assets_path: str | None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write `model_sd` (already in the export dtype) into the existing `folder` as HF safetensors:
    `model.safetensors`, or shards plus `model.safetensors.index.json`, and `config.json` and the
    tokenizer files of `hf_assets_path`. Collective over `comm`."""
    hf_sd = sd_adapter.to_hf(model_sd)
    local_sizes = {k: v.numel() * v.element_size() for k, v in hf_sd.items()}
    # ranks in order hold the pipeline stages in order, so this is the model's module order
    sizes = {k: n for part in comm.all_gather(local_sizes) for k, n in part.items()}
    mapping = shard_index(sizes, max_shard_bytes)
    writer = HuggingFaceStorageWriter(
        folder, fqn_to_index_mapping=mapping, save_distributed=True, enable_consolidation=True
    )
    dcp.save(hf_sd, storage_writer=writer, planner=PlainTensorSavePlanner(), process_group=comm.group,
             no_dist=comm.no_dist)
    if comm.rank == 0:
        shutil.rmtree(os.path.join(folder, _SHARDED_DIR))
        if max(mapping.values()) == 1:
            os.rename(os.path.join(folder, "model-00001-of-00001.safetensors"), os.path.join(folder, HF_SINGLE))
            os.remove(os.path.join(folder, HF_INDEX))
        dtype = str(next(iter(model_sd.values())).dtype).removeprefix("torch.") if model_sd else "float32"
        config = {**sd_adapter.hf_config(), "dtype": dtype, "torch_dtype": dtype}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for name in TOKENIZER_FILES if hf_assets_path else ():
            src = os.path.join(hf_assets_path, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(folder, name))
    comm.barrier()


def check_hf_folder(folder: str) -> None:
    """ConfigError unless `folder` exists and holds *.safetensors files."""
    if not os.path.isdir(folder):
        raise ConfigError(
            f"Hugging Face checkpoint folder {folder} does not exist: set --checkpoint.initial_load_path "
            "(or --model.hf_assets_path) to a folder with *.safetensors files"
        )
    if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
        raise ConfigError(
            f"Hugging Face checkpoint folder {folder} has no *.safetensors files: download them with "
            "scripts/download_hf_assets.py --assets safetensors, or point the load path elsewhere"
        )


def load_hf(
    folder: str, model_sd: dict[str, torch.Tensor], sd_adapter: StateDictAdapter, comm: Comm
) -> dict[str, torch.Tensor]:
    """Read HF safetensors from `folder` into the shape of `model_sd`; returns the loaded model state dict
    (our FQNs). ConfigError when the folder is missing, damaged or holds another model."""
    check_hf_folder(folder)
    verify_files(folder, None, comm)
    try:
        metadata = HuggingFaceStorageReader(folder).read_metadata()
    except LOAD_ERRORS as e:
        raise ConfigError(
            f"Hugging Face checkpoint {folder} is unreadable: {describe_error(e)}; "
            "re-download or re-export the safetensors files"
        ) from e
    hf_sd = sd_adapter.to_hf(model_sd)
    check_state_keys(
        folder, hf_sd, metadata, comm, model_keys=set(hf_sd), fix="load it with the model and flavor it was made for"
    )
    try:
        dcp.load(
            hf_sd,
            storage_reader=HuggingFaceStorageReader(folder),
            planner=SafeLoadPlanner(),
            process_group=comm.group,
            no_dist=comm.no_dist,
        )
    except LOAD_ERRORS as e:
        raise ConfigError(f"Hugging Face checkpoint {folder} could not be read: {describe_error(e)}") from e
    return sd_adapter.from_hf(hf_sd)


def conversion_model(
    model_name: str, flavor: str, hf_assets_path: str | None
) -> tuple[TrainSpec, BaseModelArgs, dict[str, torch.Tensor]]:
    """The model's TrainSpec, the flavor's args (vocab_size from the tokenizer in `hf_assets_path` when
    the flavor leaves it open, as in training) and an uninitialized fp32 state dict of that model."""
    spec = get_train_spec(model_name)
    if spec.state_dict_adapter is None:
        raise ConfigError(f"--model_name {model_name!r} has no state-dict adapter, so it has no Hugging Face format")
    job_config = JobConfig()
    job_config.model.name, job_config.model.flavor, job_config.model.hf_assets_path = model_name, flavor, hf_assets_path
    flavor_args = spec.model_args.get(flavor)  # an unknown flavor is reported by build_meta_model
    # Keep the flavor's own context length (update_from_config would take the training default).
    job_config.training.seq_len = getattr(flavor_args, "max_seq_len", job_config.training.seq_len)
    needs_tokenizer = getattr(flavor_args, "vocab_size", 1) <= 0 and hf_assets_path
    tokenizer = spec.build_tokenizer_fn(job_config) if needs_tokenizer else None
    args, model = build_meta_model(spec, job_config, tokenizer)
    template = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    return spec, args, template


def convert_dcp_to_hf(
    input_dir: str,
    output_dir: str,
    model_name: str,
    flavor: str,
    hf_assets_path: str | None = None,
    export_dtype: torch.dtype = torch.float32,
) -> None:
    """Model weights of the DCP step folder `input_dir` -> HF safetensors + config.json in `output_dir`."""
    metadata = read_dcp_metadata(input_dir)
    spec, args, state = conversion_model(model_name, flavor, hf_assets_path)
    comm = Comm(None)
    load_dcp(input_dir, state, comm, set(state), TRAINING_STATES, metadata)
    state = {k: v.to(export_dtype) if v.is_floating_point() else v for k, v in state.items()}
    tmp = prepare_write(output_dir, comm)
    save_hf(state, spec.state_dict_adapter(args, hf_assets_path), tmp, comm, hf_assets_path)
    commit(tmp, output_dir, comm)


def convert_hf_to_dcp(input_dir: str, output_dir: str, model_name: str, flavor: str) -> None:
    """HF safetensors in `input_dir` -> a model-only DCP folder `output_dir` (fp32), loadable with
    --checkpoint.initial_load_path."""
    check_hf_folder(input_dir)
    spec, args, state = conversion_model(model_name, flavor, input_dir)
    comm = Comm(None)
    state = load_hf(input_dir, state, spec.state_dict_adapter(args, input_dir), comm)
    write_dcp(state, prepare_write(output_dir, comm), output_dir, comm)
