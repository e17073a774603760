"""Tensor-parallel helpers shared by models: plan application, a replicate style, the styles of linear
layers (plain or float8), the async-TP gate."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from torchtitan.config.errors import ConfigError
from torchtitan.distributed.module_paths import resolve_module
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)


class ReplicateParallel(ParallelStyle):
    """Run a module (e.g. a norm) redundantly on every TP rank with Replicate DTensor parameters.

    Used for norms when sequence parallel is off: keeping their weights as DTensors on the TP mesh
    means every parameter of the model has the same kind, which foreach optimizers and clipping need.
    Inputs are plain replicated tensors; outputs go back to plain tensors.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate_params(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for p_name, param in list(mod.named_parameters(recurse=False)):
                dparam = DTensor.from_local(param, mesh, [Replicate()], run_check=False)
                mod.register_parameter(p_name, nn.Parameter(dparam, requires_grad=param.requires_grad))

        def to_dtensor(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            return tuple(
                DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
                else x
                for x in inputs
            )

        def to_local(mod: nn.Module, outputs: Any, mesh: DeviceMesh) -> Any:
            return outputs.to_local() if isinstance(outputs, DTensor) else outputs

        return distribute_module(module, device_mesh, replicate_params, to_dtensor, to_local)


class LinearTPStyles(NamedTuple):
    """The style classes a TP plan uses for the linear layers of its blocks and for their inputs."""

    colwise: type[ColwiseParallel]
    rowwise: type[RowwiseParallel]
    prepare_input: type[PrepareModuleInput]


PLAIN_TP_STYLES = LinearTPStyles(ColwiseParallel, RowwiseParallel, PrepareModuleInput)


def apply_tp_plan(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> None:
    """Apply a {dotted module path (may contain `*`) -> style} plan. A path whose module (or, for a `*`
    path, whose block container) is None is skipped (absent on this pipeline stage); a path that does
    not exist raises."""
    present = {path: style for path, style in plan.items() if _resolves(model, path)}
    parallelize_module(model, tp_mesh, present)


def _resolves(model: nn.Module, path: str) -> bool:
    fixed = path.split(".*", 1)[0]
    return fixed == "*" or resolve_module(model, fixed) is not None


def check_async_tp(job_config: Any, device_type: str) -> None:
    """Raise a one-line ConfigError if async TP is requested without its requirements (CUDA, compile)."""
    if not job_config.parallelism.enable_async_tensor_parallel:
        return
    missing = []
    if device_type != "cuda":
        missing.append("a CUDA device (symmetric memory), but this run is on CPU")
    compile_cfg = job_config.compile
    if not (compile_cfg.enable and "model" in compile_cfg.components):
        missing.append("--compile.enable with 'model' in --compile.components")
    if missing:
        raise ConfigError(
            "--parallelism.enable_async_tensor_parallel needs " + " and ".join(missing)
            + "; drop the flag or provide them"
        )


def maybe_enable_async_tp(job_config: Any, tp_mesh: DeviceMesh) -> None:
    """Turn on inductor's micro-pipeline TP pass with symmetric memory for the TP group."""
    check_async_tp(job_config, tp_mesh.device_type)
    if not job_config.parallelism.enable_async_tensor_parallel:
        return
    import torch._inductor.config as inductor_config

    # In torch 2.13 symmetric memory is set up on demand for any group (the old
    # `enable_symm_mem_for_group` call is a deprecated no-op), so the inductor switch is all it takes.
    inductor_config._micro_pipeline_tp = True
    logger.info("Async tensor parallel enabled (micro-pipeline TP)")
