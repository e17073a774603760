"""Data parallelism: FSDP2 (`fully_shard`, 1-D FSDP or 2-D HSDP) and DDP (composable `replicate`).

Both leave gradients summed, not averaged, over data-parallel ranks: the trainer already divides the
loss by the global number of label tokens, so a sum gives exactly the single-device gradient.
"""

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._composable.replicate import replicate
from torch.distributed._composable.replicate_with_fsdp import replicate as fsdp_replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from torchtitan.config.errors import ConfigError
from torchtitan.distributed.module_paths import block_container, present_modules
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

RESHARD_POLICIES = ("default", "always", "never")


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    pp_enabled: bool = False,
    cpu_offload: bool = False,
    reshard_after_forward_policy: str = "default",
    blocks_path: str = "layers",
    first_modules: tuple[str, ...] = ("tok_embeddings",),
    last_modules: tuple[str, ...] = ("norm", "output"),
) -> None:
    """Shard `model` with FSDP2: one group per block, one for the embeddings, one for norm+output, root.

    Blocks live in the container at dotted `blocks_path`; `first_modules`/`last_modules` are dotted paths
    whose module may be None (absent on this pipeline stage) but must exist. Modules left out of every
    group (e.g. a tied embedding and output head, which must stay one parameter) belong to the root group.

    A 2-D `dp_mesh` (dp_replicate, dp_shard) gives HSDP. `reshard_after_forward_policy`: "always",
    "never", or "default" (reshard unless PP, which would re-gather for every microbatch). The last
    group is not resharded by default: backward needs it immediately.
    """
    if reshard_after_forward_policy not in RESHARD_POLICIES:
        raise ConfigError(
            f"--parallelism.fsdp_reshard_after_forward={reshard_after_forward_policy!r} is invalid; "
            f"use one of {', '.join(RESHARD_POLICIES)}"
        )
    config: dict[str, Any] = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
    }
    if cpu_offload:
        # Pinned memory needs an accelerator; on a CPU-only run offloading is a no-op placement anyway.
        config["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.accelerator.is_available())
    reshard = {"always": True, "never": False, "default": not pp_enabled}[reshard_after_forward_policy]

    for module in present_modules(model, first_modules):
        fully_shard(module, reshard_after_forward=reshard, **config)
    for block in block_container(model, blocks_path).children():
        fully_shard(block, reshard_after_forward=reshard, **config)
    last = present_modules(model, last_modules)
    if last:
        fully_shard(last, reshard_after_forward=reshard_after_forward_policy == "always", **config)
    fully_shard(model, **config)
    disable_fsdp_gradient_division(model)
    logger.info(f"Applied {'HSDP' if dp_mesh.ndim == 2 else 'FSDP'} over mesh {dp_mesh.mesh_dim_names}")


def disable_fsdp_gradient_division(model: nn.Module) -> None:
    """Make every FSDP group sum gradients instead of averaging them.

    Forcing sum reductions avoids PREMUL_SUM, which gloo does not implement.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _sum_allreduce_hook(group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: all-reduce SUM, no division by the world size."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, compile_enabled: bool = False, pp_enabled: bool = False) -> None:
    """Replicate `model` over a 1-D mesh with DDP, summing gradients.

    Under PP the pipeline schedule drives gradient synchronization itself, which it does for FSDP-style
    modules: there the part is replicated with `replicate_with_fsdp` (FSDP2 machinery, no sharding).
    """
    if pp_enabled:
        fsdp_replicate(model, mesh=dp_mesh)
        disable_fsdp_gradient_division(model)
        logger.info("Applied DDP (FSDP-style replicate, for the pipeline schedule) over mesh dp_replicate")
        return
    if compile_enabled:
        # Split compiled graphs at DDP bucket boundaries so communication overlaps compute.
        torch._dynamo.config.optimize_ddp = "ddp_optimizer"
    replicate(model, device_mesh=dp_mesh, bucket_cap_mb=100)
    model.register_comm_hook(dp_mesh.get_group(), _sum_allreduce_hook)
    logger.info("Applied DDP (replicate) over mesh dp_replicate")
