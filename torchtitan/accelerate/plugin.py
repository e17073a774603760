"""TorchTitanPlugin: the configuration an Accelerator runs with, and the door to our own trainer."""

from __future__ import annotations

import os
from typing import Any

from torchtitan.accelerate.config import resolve_job_config
from torchtitan.config import JobConfig
from torchtitan.tools.logging import init_logger, logger as root_logger


def world_size() -> int:
    """The launcher's WORLD_SIZE (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def ensure_logging() -> None:
    """Set up torchtitan's log output unless the application already did."""
    if not root_logger.handlers:
        init_logger()


def set_gradient_accumulation(job_config: JobConfig, steps: int, n_ranks: int) -> None:
    """Express `steps` microbatches per optimizer step as training.global_batch_size for `n_ranks` ranks
    (the degrees are checked against the world size later, by the Accelerator or the trainer)."""
    p = job_config.parallelism
    shard = p.data_parallel_shard_degree
    if shard == -1:
        others = p.data_parallel_replicate_degree * p.context_parallel_degree
        shard = max(1, n_ranks // (others * p.tensor_parallel_degree * p.pipeline_parallel_degree))
    dp = p.data_parallel_replicate_degree * shard
    job_config.training.global_batch_size = job_config.training.local_batch_size * steps * dp


class TorchTitanPlugin:
    """Configuration for `Accelerator` (and `trainer()`).

    `job_config`: a dict or TOML path in our schema or the Accelerate page's shape, a JobConfig, or None.
    Unset values come from TORCHTITAN_* environment variables, then the defaults; explicit arguments win.
    """

    def __init__(
        self,
        model_name: str | None = None,
        job_config: dict[str, Any] | str | os.PathLike | JobConfig | None = None,
    ):
        ensure_logging()
        self.job_config, self.gradient_accumulation_steps = resolve_job_config(job_config, model_name)
        if self.gradient_accumulation_steps is not None:
            set_gradient_accumulation(self.job_config, self.gradient_accumulation_steps, world_size())

    @property
    def model_name(self) -> str:
        return self.job_config.model.name

    def trainer(self) -> Any:
        """Our trainer (`torchtitan.train.Trainer`) for this config: call `.train()` on it. It runs every
        layout, pipeline and context parallel included; launch it under torchrun for several ranks."""
        from torchtitan.train import Trainer

        return Trainer(self.job_config)
