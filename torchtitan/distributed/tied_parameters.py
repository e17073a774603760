"""Tied parameters across pipeline stages (Megatron's embedding group), for any model.

A model may use one parameter in two modules, e.g. a tied input embedding and output head. When pipeline
parallelism puts those modules on different stages, each stage holds its own copy. They stay one
parameter in effect: the copies start equal (`sync_weights`, from the first stage's), their gradients are
summed after the backward of a step (`sync_grads`), so they take identical optimizer steps, and gradient
clipping counts the first copy only (`uncounted`). Copies are found by FQN in the model parts each time,
since materialization and FSDP replace parameter objects; their local shards align across stages because
every stage has the same data/tensor-parallel meshes and the same placements for a module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def shared_parameter_names(model: nn.Module) -> list[list[str]]:
    """FQN lists of the parameters `model` holds under more than one name (e.g. a tied output head's
    `lm_head.weight` with `model.embed_tokens.weight`), each list in module order."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [fqns for fqns in names.values() if len(fqns) > 1]


def _owner_stage(fqn: str, parts_fqns: list[list[str]]) -> int:
    return next(i for i, modules in enumerate(parts_fqns) if any(fqn.startswith(m + ".") for m in modules))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _in_place(t: torch.Tensor, collective: Callable[[torch.Tensor], object]) -> None:
    """Run `collective` on `t`'s local values in place (through a contiguous buffer when needed)."""
    local = _local(t)
    buf = local if local.is_contiguous() else local.contiguous()
    collective(buf)
    if buf is not local:
        local.copy_(buf)


class TiedParameters:
    """This rank's copies of the parameters tied across pipeline stages, with the process groups that
    join the copies of one data/tensor-parallel coordinate. Build it on every rank (it creates groups)."""

    def __init__(
        self,
        model: nn.Module,
        parts_fqns: list[list[str]],
        rank_of_stage: Mapping[int, int],
        my_stages: Sequence[int],
        parts: Sequence[nn.Module],
        pp_mesh: DeviceMesh,
        world_mesh: DeviceMesh,
    ) -> None:
        """`model`: the whole (meta) model before the split, whose shared parameters are the ties;
        `parts_fqns`: every stage's modules; `rank_of_stage`: the PP rank of each stage; `parts`: this
        rank's model parts, those of `my_stages`; `pp_mesh`, `world_mesh`: the PP and the whole device mesh."""
        self.parts = list(parts)
        # Each tie: [(stage, fqn), ...] over the stages holding a copy, first stage first.
        ties = []
        for fqns in shared_parameter_names(model):
            copies = sorted({_owner_stage(f, parts_fqns): f for f in fqns}.items())
            if len(copies) > 1:
                ties.append(copies)
        my_part = {sid: part for sid, part in zip(my_stages, self.parts)}
        # (local copies as (part, fqn), owner stage is here, group or None, global rank of the owner)
        self.ties: list[tuple[list[tuple[nn.Module, str]], bool, dist.ProcessGroup | None, int]] = []
        groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        row = pp_mesh.mesh.tolist()  # the global ranks of this rank's PP stages, by PP rank
        for copies in ties:
            pp_ranks = tuple(sorted({rank_of_stage[s] for s, _ in copies}))
            if pp_ranks not in groups:
                groups[pp_ranks] = self._group(pp_ranks, pp_mesh, world_mesh)
            group, owner = groups[pp_ranks], copies[0][0]
            local = [(my_part[s], f) for s, f in copies if s in my_part]
            if local:
                self.ties.append((local, owner in my_part, group, row[rank_of_stage[owner]]))

    @staticmethod
    def _group(pp_ranks: tuple[int, ...], pp_mesh: DeviceMesh, world_mesh: DeviceMesh) -> dist.ProcessGroup | None:
        """None when one PP rank holds every copy; the PP group when all PP ranks do; else a new group per
        data/tensor-parallel coordinate (made collectively, so every rank runs this in the same order)."""
        if len(pp_ranks) == 1:
            return None
        if len(pp_ranks) == pp_mesh.size():
            return pp_mesh.get_group()
        pp_dim = world_mesh.mesh_dim_names.index(pp_mesh.mesh_dim_names[0])
        rows = world_mesh.mesh.movedim(pp_dim, -1).reshape(-1, pp_mesh.size())
        group, _ = dist.new_subgroups_by_enumeration([[int(r[i]) for i in pp_ranks] for r in rows])
        return group

    def _params(self, local: list[tuple[nn.Module, str]]) -> list[nn.Parameter]:
        return [part.get_parameter(fqn) for part, fqn in local]

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Give every copy the first stage's values (after initialization or loading)."""
        for local, _, group, owner_rank in self.ties:
            params = self._params(local)
            if group is not None:
                _in_place(params[0], lambda t: dist.broadcast(t, src=owner_rank, group=group))
            for p in params[1:]:
                _local(p).copy_(_local(params[0]))

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Sum the copies' gradients into each copy (after the step's backward, before clipping)."""
        for local, _, group, _ in self.ties:
            params = self._params(local)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                    # e.g. a TP embedding's gradient comes replicated: shard it as the weight, as the copies are
                    p.grad = p.grad.redistribute(p.device_mesh, p.placements)
            total = params[0].grad
            for p in params[1:]:
                _local(total).add_(_local(p.grad))
            if group is not None:
                _in_place(total, lambda t: dist.all_reduce(t, group=group))
            for p in params[1:]:
                _local(p.grad).copy_(_local(total))

    def uncounted(self) -> list[nn.Parameter]:
        """The copies a gradient norm must leave out: all but the first stage's."""
        out = []
        for local, has_owner, _, _ in self.ties:
            params = self._params(local)
            out += params[1:] if has_owner else params
        return out
