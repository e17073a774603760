"""ParallelDims: the parallelism degrees of a run, their validation and the DeviceMesh built from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchtitan.config.errors import ConfigError
from torchtitan.config.validation import gradient_accumulation_steps

# ParallelDims field -> the config flag that sets it (used in error messages).
FLAGS = {
    "dp_replicate": "parallelism.data_parallel_replicate_degree",
    "dp_shard": "parallelism.data_parallel_shard_degree",
    "cp": "parallelism.context_parallel_degree",
    "tp": "parallelism.tensor_parallel_degree",
    "pp": "parallelism.pipeline_parallel_degree",
    "ep": "parallelism.expert_parallel_degree",
    "etp": "parallelism.expert_tensor_parallel_degree",
}
# Mesh dimension order, outermost first: PP crosses nodes, TP stays within a node.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# Flattened views: name -> the mesh dims they merge.
FLAT_DIMS = {
    "dp": ("dp_replicate", "dp_shard"),  # data loading
    "dp_shard_cp": ("dp_shard", "cp"),  # FSDP sharding
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),  # loss / token-count reduction
    # Lets DTensor reduce FSDP x TP partial values (e.g. gradient norms) in one collective.
    "dp_shard_cp_tp": ("dp_shard", "cp", "tp"),
}


@dataclass
class ParallelDims:
    """Degrees of every parallelism; `dp_shard=-1` takes the ranks the others leave.

    Validation runs at construction, before any process group exists. The mesh is built lazily and
    only holds dims with degree > 1, so a single process needs no process group at all.
    """

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    ep: int
    etp: int
    world_size: int
    enable_loss_parallel: bool = True
    enable_sequence_parallel: bool = True
    _world_mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _flat_meshes: dict[str, DeviceMesh] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def from_job_config(cls, job_config: Any, world_size: int) -> ParallelDims:
        """Build from `job_config.parallelism` for `world_size` ranks (raises ConfigError if invalid)."""
        p = job_config.parallelism
        return cls(
            dp_replicate=p.data_parallel_replicate_degree,
            dp_shard=p.data_parallel_shard_degree,
            cp=p.context_parallel_degree,
            tp=p.tensor_parallel_degree,
            pp=p.pipeline_parallel_degree,
            ep=p.expert_parallel_degree,
            etp=p.expert_tensor_parallel_degree,
            world_size=world_size,
            enable_loss_parallel=not p.disable_loss_parallel,
            enable_sequence_parallel=not p.disable_sequence_parallel,
        )

    def _validate(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world size {self.world_size} is invalid; launch at least one process")
        for name in FLAGS:
            value = getattr(self, name)
            if value < 1 and not (name == "dp_shard" and value == -1):
                allowed = "an integer >= 1 or -1 (use the remaining ranks)" if name == "dp_shard" else "an integer >= 1"
                raise ConfigError(f"--{FLAGS[name]}={value} is invalid; set it to {allowed}")
        others = self.dp_replicate * self.cp * self.tp * self.pp
        names = " * ".join(f"{FLAGS[n].split('.')[1]}={getattr(self, n)}" for n in ("dp_replicate", "cp", "tp", "pp"))
        if self.dp_shard == -1:
            if self.world_size % others != 0:
                raise ConfigError(
                    f"world size {self.world_size} is not divisible by {names} = {others}; "
                    f"choose degrees whose product divides {self.world_size}"
                )
            self.dp_shard = self.world_size // others
        product = others * self.dp_shard
        if product != self.world_size:
            raise ConfigError(
                f"parallelism degrees multiply to {product} ({names} * data_parallel_shard_degree={self.dp_shard}) "
                f"but the world size is {self.world_size}; make the product equal {self.world_size} "
                f"(--{FLAGS['dp_shard']}=-1 takes the remaining ranks)"
            )
        if self.etp not in (1, self.tp):
            raise ConfigError(
                f"--{FLAGS['etp']}={self.etp} must be 1 or equal --{FLAGS['tp']}={self.tp}"
            )
        if self.ep > 1:
            # EP borrows ranks from dp_shard * cp (and from tp when experts are not tensor-parallel).
            pool = self.dp_shard * self.cp * (self.tp if self.etp == 1 else 1)
            if pool % self.ep != 0:
                raise ConfigError(
                    f"--{FLAGS['ep']}={self.ep} must divide data_parallel_shard_degree * context_parallel_degree"
                    f"{' * tensor_parallel_degree' if self.etp == 1 else ''} = {pool}"
                )

    # ---- what is enabled -------------------------------------------------------------------------
    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp_replicate > 1 or self.dp_shard > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP shards over dp_shard and cp together (CP ranks hold different tokens of one batch)."""
        return self.dp_shard > 1 or self.cp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def sequence_parallel_enabled(self) -> bool:
        return self.tp_enabled and self.enable_sequence_parallel

    @property
    def loss_parallel_enabled(self) -> bool:
        """Logits stay vocab-sharded over TP; the trainer must run loss and backward in `loss_parallel()`."""
        return self.tp_enabled and self.enable_loss_parallel

    @property
    def dp_world_size(self) -> int:
        """Number of data-parallel ranks, i.e. of distinct batch slices."""
        return self.dp_replicate * self.dp_shard

    @property
    def non_data_parallel_size(self) -> int:
        return self.cp * self.tp * self.pp

    @property
    def seq_len_divisor(self) -> int:
        """seq_len must be a multiple of this: TP degree under SP, 2 * CP degree for CP load balancing."""
        sp = self.tp if self.sequence_parallel_enabled else 1
        return sp * (2 * self.cp if self.cp_enabled else 1)

    # ---- mesh -----------------------------------------------------------------------------------
    def build_mesh(self, device_type: str | None = None) -> DeviceMesh | None:
        """Build the world mesh (dims with degree > 1) and its flattened views; None for one rank."""
        if self._world_mesh is not None or self.world_size == 1:
            return self._world_mesh
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        names = tuple(n for n in MESH_DIMS if getattr(self, n) > 1)
        mesh = init_device_mesh(device_type, tuple(getattr(self, n) for n in names), mesh_dim_names=names)
        for flat, parts in FLAT_DIMS.items():
            present = tuple(p for p in parts if p in names)
            if len(present) > 1:
                self._flat_meshes[flat] = mesh[present]._flatten(flat)
        self._world_mesh = mesh
        return mesh

    @property
    def world_mesh(self) -> DeviceMesh | None:
        return self.build_mesh()

    def get_mesh(self, name: str | tuple[str, ...]) -> DeviceMesh | None:
        """The (sub)mesh for a dim, a flattened view ("dp", "dp_shard_cp", "dp_cp") or a tuple of them.

        Dims of degree 1 are dropped; returns None when nothing of degree > 1 is left.
        """
        names = (name,) if isinstance(name, str) else name
        kept = tuple(self._resolve(n) for n in names)
        kept = tuple(n for n in kept if n is not None)
        if not kept or self.world_mesh is None:
            return None
        if len(kept) == 1:
            return self._flat_meshes.get(kept[0]) or self.world_mesh[kept[0]]
        return self.world_mesh[kept]

    def _resolve(self, name: str) -> str | None:
        """Mesh dim name standing for `name`, or None if its degree is 1."""
        if name in FLAT_DIMS:
            present = [p for p in FLAT_DIMS[name] if getattr(self, p) > 1]
            return None if not present else (present[0] if len(present) == 1 else name)
        if name not in MESH_DIMS:
            raise ValueError(f"unknown mesh dim {name!r}; expected one of {MESH_DIMS + tuple(FLAT_DIMS)}")
        return name if getattr(self, name) > 1 else None

    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (0 without data parallelism)."""
        mesh = self.get_mesh("dp")
        return 0 if mesh is None else mesh.get_local_rank()

    def describe(self) -> str:
        """One line with every degree, e.g. for logs and dry runs."""
        degrees = ", ".join(f"{n}={getattr(self, n)}" for n in FLAGS)
        flags = f"sequence_parallel={self.sequence_parallel_enabled}, loss_parallel={self.loss_parallel_enabled}"
        return f"world_size={self.world_size}: {degrees}; {flags}"


def validate_model(parallel_dims: ParallelDims, model_args: Any, job_config: Any) -> None:
    """Check the layout against the model and batch shape; raises a one-line ConfigError."""
    tp = parallel_dims.tp
    for attr, heads in model_args.tp_head_counts().items():
        if heads % tp != 0:
            raise ConfigError(
                f"--{FLAGS['tp']}={tp} must divide the model's {attr}={heads} "
                f"(model {job_config.model.name} flavor {job_config.model.flavor}); pick a divisor of {heads}"
            )
    divisor = parallel_dims.seq_len_divisor
    seq_lens = [("training.seq_len", job_config.training.seq_len)]
    if job_config.validation.enable:
        seq_lens.append(("validation.seq_len", job_config.validation.seq_len))
    for key, seq_len in seq_lens:
        if seq_len % divisor != 0:
            why = " * ".join(
                [f"tensor_parallel_degree={tp} (sequence parallel)"] * parallel_dims.sequence_parallel_enabled
                + [f"2 * context_parallel_degree={parallel_dims.cp}"] * parallel_dims.cp_enabled
            )
            raise ConfigError(
                f"--{key}={seq_len} must be divisible by {divisor} ({why}); "
                f"use e.g. --{key}={math.ceil(seq_len / divisor) * divisor}"
            )
    gradient_accumulation_steps(job_config.training, parallel_dims.dp_world_size)
