"""Accelerator: our parallel stack (FSDP2/HSDP/DDP, TP+SP, AC, compile, DCP) under a user's own loop."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from torchtitan.accelerate.data import PreparedDataLoader
from torchtitan.accelerate.hf_models import fsdp_config, is_hf_causal_lm, parallelize_hf_model
from torchtitan.accelerate.plugin import TorchTitanPlugin, ensure_logging, set_gradient_accumulation, world_size
from torchtitan.accelerate.state import load_state, save_model, save_state
from torchtitan.config import ConfigError
from torchtitan.config.schema import BOOL_WORDS
from torchtitan.config.validation import gradient_accumulation_steps as accumulation_steps_for
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.data_parallel import apply_ddp, disable_fsdp_gradient_division
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.tools.logging import get_logger
from torchtitan.tools.utils import TORCH_DTYPES, cpu_has_native_bf16

logger = get_logger(__name__)

MIXED_PRECISION = {"no": "float32", "fp32": "float32", "bf16": "bfloat16"}
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _canonical(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


class AcceleratedOptimizer:
    """The user's optimizer; `step`/`zero_grad` act only on the last microbatch of an accumulation."""

    def __init__(self, optimizer: Optimizer, accelerator: Accelerator):
        self.optimizer = optimizer
        self.accelerator = accelerator

    def step(self, closure: Any = None) -> Any:
        if self.accelerator.sync_gradients:
            return self.optimizer.step(closure)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.accelerator.sync_gradients:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


class AcceleratedScheduler:
    """The user's LR scheduler; steps once per optimizer step (skipped on accumulation microbatches)."""

    def __init__(self, scheduler: LRScheduler, accelerator: Accelerator):
        self.scheduler = scheduler
        self.accelerator = accelerator

    def step(self, *args: Any, **kwargs: Any) -> None:
        if self.accelerator.sync_gradients:
            self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)


def _plugin_from_env() -> TorchTitanPlugin:
    flag = os.environ.get("ACCELERATE_USE_TORCHTITAN", "").strip().lower()
    if flag not in BOOL_WORDS or flag in ("false", "0", "no", "off"):
        raise ConfigError(
            "Accelerator() got no torchtitan_plugin; pass torchtitan_plugin=TorchTitanPlugin(...) "
            "or set ACCELERATE_USE_TORCHTITAN=true to build one from the TORCHTITAN_* environment"
        )
    return TorchTitanPlugin()


class Accelerator:
    """Accelerate-style wrapper: `prepare()` parallelizes models per the plugin's config, rebinds
    optimizers, re-shards dataloaders and wraps schedulers; `accumulate`/`backward` handle accumulation.

    Data-parallel gradients are summed (as in our trainer) and `backward` divides the loss by
    accumulation steps x data-parallel degree, so call `accelerator.backward(loss)`, not `loss.backward()`.
    """

    def __init__(
        self,
        torchtitan_plugin: TorchTitanPlugin | None = None,
        mixed_precision: str | None = None,
        gradient_accumulation_steps: int | None = None,
    ):
        ensure_logging()
        self.plugin = plugin = torchtitan_plugin or _plugin_from_env()
        self.job_config = jc = plugin.job_config
        p = jc.parallelism
        for key, degree in (("pipeline_parallel_degree", p.pipeline_parallel_degree),
                            ("context_parallel_degree", p.context_parallel_degree)):
            if degree > 1:
                raise ConfigError(
                    f"parallelism.{key}={degree} needs torchtitan's own training loop; use "
                    "TorchTitanPlugin(...).trainer().train() or ./run_train.sh instead of Accelerator"
                )
        precision = mixed_precision or "no"
        if precision not in MIXED_PRECISION:
            raise ConfigError(
                f"Accelerator(mixed_precision={precision!r}) is not supported; use one of {sorted(MIXED_PRECISION)}"
            )
        jc.training.mixed_precision_param = MIXED_PRECISION[precision]

        self.device = dist_utils.init_distributed(jc.comm, jc.job.dump_folder)
        self.parallel_dims = pd = ParallelDims.from_job_config(jc, world_size())
        pd.enable_loss_parallel = False  # the user's loop computes the loss on full logits
        if gradient_accumulation_steps is not None:
            if gradient_accumulation_steps < 1:
                raise ConfigError(
                    f"Accelerator(gradient_accumulation_steps={gradient_accumulation_steps}) must be >= 1"
                )
            set_gradient_accumulation(jc, gradient_accumulation_steps, pd.world_size)
        self.gradient_accumulation_steps = accumulation_steps_for(jc.training, pd.dp_world_size)
        self.seed = dist_utils.set_determinism(pd, self.device, jc.debug)
        pd.build_mesh(self.device.type)
        self.sync_gradients = True
        self._microstep = 0
        self._models: list[nn.Module] = []
        self._optimizers: list[AcceleratedOptimizer] = []
        self._schedulers: list[AcceleratedScheduler] = []
        self._dataloaders: list[PreparedDataLoader] = []
        logger.info(
            f"Accelerator: {pd.describe()}; device {self.device}; mixed precision {precision}; "
            f"gradient accumulation {self.gradient_accumulation_steps}"
        )

    # ---- process information ----------------------------------------------------------------------
    @property
    def process_index(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def num_processes(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def print(self, *args: Any, **kwargs: Any) -> None:
        """print() on the main process only."""
        if self.is_main_process:
            print(*args, **kwargs)

    def wait_for_everyone(self) -> None:
        """A barrier over all processes (no-op on one)."""
        if dist.is_initialized():
            dist.barrier()

    def end_training(self) -> None:
        """Wait for every rank, then destroy the process group."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # ---- prepare ------------------------------------------------------------------------------------
    def prepare(self, *objects: Any) -> Any:
        """Prepare models, optimizers, dataloaders and schedulers given in any order; returns them in the
        same order (a single object for a single argument). Optimizers must come in the same call as
        the models whose parameters they hold."""
        param_map: dict[int, nn.Parameter] = {}
        keep_alive: list[nn.Parameter] = []  # old parameters, so their ids stay unique until rebinding
        out = list(objects)
        for i, obj in enumerate(objects):
            if isinstance(obj, nn.Module):
                keep_alive += list(obj.parameters())
                out[i] = self._prepare_model(obj, param_map)
        optimizers: dict[int, AcceleratedOptimizer] = {}
        for i, obj in enumerate(objects):
            if isinstance(obj, Optimizer):
                out[i] = optimizers[id(obj)] = self._prepare_optimizer(obj, param_map)
        for i, obj in enumerate(objects):
            if isinstance(obj, LRScheduler):
                out[i] = AcceleratedScheduler(obj, self)
                self._schedulers.append(out[i])
            elif isinstance(obj, DataLoader):
                out[i] = PreparedDataLoader(
                    obj, self.parallel_dims.dp_rank(), self.parallel_dims.dp_world_size, self.seed, self.device
                )
                self._dataloaders.append(out[i])
        del keep_alive
        return out[0] if len(out) == 1 else tuple(out)

    def _prepare_model(self, model: nn.Module, param_map: dict[int, nn.Parameter]) -> nn.Module:
        old = {id(p): _canonical(n) for n, p in model.named_parameters(remove_duplicate=False)}
        model.to(self.device)
        self._broadcast_from_rank0(model)
        pd, jc = self.parallel_dims, self.job_config
        param_dtype = TORCH_DTYPES[jc.training.mixed_precision_param]
        if is_hf_causal_lm(model):
            parallelize_hf_model(model, pd, jc)
        elif type(model) is self._train_spec_model_cls():
            self._train_spec().parallelize_fn(model, pd, jc)
        else:
            self._parallelize_generic(model, param_dtype)
        if not pd.fsdp_enabled and param_dtype != torch.float32:
            self._autocast_forward(model, param_dtype)
        new = {_canonical(n): p for n, p in model.named_parameters(remove_duplicate=False)}
        for pid, name in old.items():
            param_map[pid] = new[name]
        self._models.append(model)
        return model

    def _train_spec(self) -> Any:
        import torchtitan.builtins  # noqa: F401  (registers the built-in models)
        from torchtitan.protocols.train_spec import get_train_spec

        return get_train_spec(self.job_config.model.name)

    def _train_spec_model_cls(self) -> type | None:
        try:
            return self._train_spec().model_cls
        except ConfigError:
            return None

    def _parallelize_generic(self, model: nn.Module, param_dtype: torch.dtype) -> None:
        """Any other module: data parallelism on the whole module; TP needs a known architecture."""
        from torch.distributed.fsdp import fully_shard

        pd = self.parallel_dims
        if pd.tp_enabled:
            raise ConfigError(
                f"parallelism.tensor_parallel_degree={pd.tp}: no tensor-parallel plan for {type(model).__name__}; "
                "use a Llama, Mistral, Qwen2 or Qwen3 transformers model, a torchtitan model, "
                "or data parallelism only"
            )
        if pd.fsdp_enabled:
            mesh = pd.get_mesh(("dp_replicate", "dp_shard_cp"))
            reduce_dtype = TORCH_DTYPES[self.job_config.training.mixed_precision_reduce]
            fully_shard(model, mesh=mesh, **fsdp_config(self.job_config, param_dtype, reduce_dtype))
            disable_fsdp_gradient_division(model)
        elif pd.dp_replicate_enabled:
            apply_ddp(model, pd.get_mesh("dp_replicate"))

    def _broadcast_from_rank0(self, model: nn.Module) -> None:
        """Give every rank rank 0's weights (models are often randomly initialized on each rank)."""
        if not dist.is_initialized():
            return
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)

    def _autocast_forward(self, model: nn.Module, dtype: torch.dtype) -> None:
        if self.device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning(
                "mixed_precision='bf16' on a CPU without native bf16 "
                f"({torch.backends.cpu.get_cpu_capability()}) is much slower than 'no'"
            )
        model.forward = torch.autocast(self.device.type, dtype=dtype)(model.forward)

    def _prepare_optimizer(self, optimizer: Optimizer, param_map: dict[int, nn.Parameter]) -> AcceleratedOptimizer:
        """Rebind the optimizer in place to the parallelized parameters: class, param groups and
        hyperparameters are kept (schedulers built on it stay valid); its (empty) state is reset."""
        for group in optimizer.param_groups:
            missing = [p for p in group["params"] if id(p) not in param_map]
            if missing:
                raise ConfigError(
                    f"prepare(): {type(optimizer).__name__} holds {len(missing)} parameter(s) of no model in this "
                    "call; pass the model and its optimizer to the same prepare() call"
                )
            group["params"] = [param_map[id(p)] for p in group["params"]]
        optimizer.state.clear()
        wrapped = AcceleratedOptimizer(optimizer, self)
        self._optimizers.append(wrapped)
        return wrapped

    # ---- the loop ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulate(self, *models: nn.Module) -> Iterator[None]:
        """One microbatch: gradients are reduced over data-parallel ranks, and the optimizer and
        scheduler step, only on every `gradient_accumulation_steps`-th call."""
        self._microstep += 1
        self.sync_gradients = self._microstep % self.gradient_accumulation_steps == 0
        for model in models or self._models:
            sync = getattr(model, "set_requires_gradient_sync", None)
            if sync is not None:
                sync(self.sync_gradients)
        yield

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """`loss.backward()` with the loss divided by accumulation steps x data-parallel degree."""
        scale = self.gradient_accumulation_steps * self.parallel_dims.dp_world_size
        (loss / scale).backward(**kwargs)

    def clip_grad_norm_(
        self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        """Clip by the true global gradient norm over FSDP/TP shards; returns that norm."""
        return dist_utils.clip_grad_norm_(parameters, max_norm, norm_type)

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        """The model itself (FSDP2 and TP parallelize in place), without a torch.compile wrapper."""
        return getattr(model, "_orig_mod", model)

    # ---- checkpoints --------------------------------------------------------------------------------
    def save_state(self, output_dir: str) -> None:
        """Save models, optimizers, schedulers, dataloader positions and RNG with DCP (any layout can load it)."""
        save_state(self, output_dir)

    def load_state(self, input_dir: str) -> None:
        """Load a `save_state` checkpoint, also one saved under another parallel layout."""
        load_state(self, input_dir)

    def save_model(self, model: nn.Module, save_directory: str) -> None:
        """Write the full weights as safetensors (plus config.json for transformers models) on rank 0."""
        save_model(model, save_directory)
