"""The validation loop: the held-out loss and perplexity, at step 1 and every `validation.freq` steps.

A model family plugs its own in through `TrainSpec.build_validator_fn` (same signature as `build_validator`).
The loss is the cross-entropy summed over every label token of the split divided by their global count, so it
is the same under every layout: the validation dataloader pads its last partial global chunk (labels
IGNORE_INDEX) instead of dropping it, and every rank runs the same number of forwards.
"""

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from torchtitan.components.dataloader import DataExhaustedError, build_text_validation_dataloader
from torchtitan.components.loss import IGNORE_INDEX, LossFunction
from torchtitan.config import ConfigError
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.utils import dist_sum, loss_parallel_context
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)

__all__ = ["ForwardLoss", "Validator", "build_validator", "build_validator_for"]

# (model_parts, inputs, labels) -> the loss summed over this batch's label tokens on this rank, a 0-dim tensor.
# Under pipeline parallelism the schedule's eval path fits this shape (the lead wires it).
ForwardLoss = Callable[[list[nn.Module], torch.Tensor, torch.Tensor], torch.Tensor]


class Validator:
    """Evaluates `model_parts` on the whole validation split (or its first `validation.steps` batches).

    The model runs in eval mode under no_grad; the RNG state is restored afterwards and the training
    dataloader is never touched, so training is not perturbed. All ranks stop together at the first batch
    that some rank does not have (one all-reduce per batch), so loaders whose shards differ in length cannot
    hang the job.
    """

    def __init__(
        self,
        job_config: Any,
        dataloader: Any,
        parallel_dims: ParallelDims,
        loss_fn: LossFunction,
        metrics_processor: Any,
        device: torch.device,
        autocast: contextlib.AbstractContextManager | None = None,
    ):
        vcfg = job_config.validation
        self.freq = vcfg.freq
        self.steps = vcfg.steps
        self.dataloader = dataloader
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self.metrics = metrics_processor
        self.device = device
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self._start_state = dataloader.state_dict()

    def should_validate(self, step: int) -> bool:
        """Validate after training step 1 and every `validation.freq` steps."""
        return step == 1 or step % self.freq == 0

    def forward_loss(self, model_parts: list[nn.Module], inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The default ForwardLoss: one model part (no pipeline), loss-parallel under TP."""
        with self.autocast, loss_parallel_context(self.parallel_dims):
            loss = self.loss_fn(model_parts[0](inputs), labels)
        return loss.full_tensor() if isinstance(loss, DTensor) else loss

    @torch.no_grad()
    def validate(
        self, model_parts: list[nn.Module], step: int, forward_loss: ForwardLoss | None = None
    ) -> dict[str, Any]:
        """Run the split from its start, log the result for training step `step` and return its record."""
        forward_loss = forward_loss or self.forward_loss
        modes = [m.training for m in model_parts]
        for m in model_parts:
            m.eval()
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        local_tokens = 0
        devices = [self.device] if self.device.type != "cpu" else []
        self.dataloader.load_state_dict(self._start_state)
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            batches = iter(self.dataloader)
            done = 0
            while self.steps == -1 or done < self.steps:
                batch = _next_or_none(batches)
                if not self._all_ranks_have(batch is not None):
                    break
                input_dict, labels = batch
                inputs, labels = input_dict["input"].to(self.device), labels.to(self.device)
                loss_sum += forward_loss(model_parts, inputs, labels).double()
                local_tokens += int((labels != IGNORE_INDEX).sum())
                done += 1
        for m, mode in zip(model_parts, modes):
            m.train(mode)
        # Every CP rank reads the same batches (data is split over dp only) and holds part of their loss.
        pd = self.parallel_dims
        n_tokens = int(dist_sum(local_tokens, pd.get_mesh("dp")))
        if n_tokens == 0:
            raise RuntimeError(f"validation at step {step} saw no label tokens; the validation split is empty")
        loss = dist_sum(loss_sum, pd.get_mesh("dp_cp")) / n_tokens
        perplexity = math.exp(loss) if loss < 700 else math.inf
        elapsed = time.perf_counter() - start
        return self.metrics.log_validation(step, loss, perplexity, n_tokens, elapsed)

    def _all_ranks_have(self, have: bool) -> bool:
        """True when every rank has a batch; ranks that have one are told when another ran out."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return have
        flag = torch.tensor([int(have)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if have and not flag.item():
            logger.warning("validation: another rank's shard ended first; stopping all ranks together")
        return bool(flag.item())


def _next_or_none(batches: Any) -> Any:
    try:
        return next(batches)
    except (StopIteration, DataExhaustedError):
        return None


def build_validator(
    job_config: Any,
    dp_world_size: int,
    dp_rank: int,
    tokenizer: Any,
    parallel_dims: ParallelDims,
    loss_fn: LossFunction,
    metrics_processor: Any,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
) -> Validator:
    """The default `TrainSpec.build_validator_fn`: a Validator over `validation.dataset`, read per
    data-parallel rank like the training data."""
    dataloader = build_text_validation_dataloader(dp_world_size, dp_rank, tokenizer, job_config)
    return Validator(job_config, dataloader, parallel_dims, loss_fn, metrics_processor, device, autocast)


def build_validator_for(
    spec: Any,
    job_config: Any,
    parallel_dims: ParallelDims,
    tokenizer: Any,
    loss_fn: LossFunction,
    metrics_processor: Any,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
) -> Validator | None:
    """The trainer's validator: None unless `validation.enable`; built by the TrainSpec's `build_validator_fn`."""
    if not job_config.validation.enable:
        return None
    if spec.build_validator_fn is None:
        raise ConfigError(
            f"validation.enable=true, but model.name={job_config.model.name!r} registers no build_validator_fn; "
            "drop the flag or register one in its TrainSpec"
        )
    pd = parallel_dims
    return spec.build_validator_fn(
        job_config, pd.dp_world_size, pd.dp_rank(), tokenizer, pd, loss_fn, metrics_processor, device, autocast
    )
