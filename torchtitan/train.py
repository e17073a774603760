"""The one generic training loop: `python -m torchtitan.train --job.config_file FILE [overrides]`."""

import contextlib
import os
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

import torchtitan.builtins  # noqa: F401  (registers the built-in models and converters)
from torchtitan.components.checkpoint import CheckpointManager, validate_seed_checkpoint
from torchtitan.components.dataloader import DataExhaustedError
from torchtitan.components.loss import TokenNormalizedLoss
from torchtitan.components.metrics import build_metrics_processor
from torchtitan.components.validate import build_validator_for
from torchtitan.config import ConfigError, ConfigManager, JobConfig
from torchtitan.config.validation import gradient_accumulation_steps
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.compile import disable_compile_caches_for_tp
from torchtitan.distributed.context_parallel import build_context_parallel, rope_context
from torchtitan.distributed.parallel_dims import ParallelDims, validate_model
from torchtitan.protocols.model_converter import build_model_converters
from torchtitan.protocols.train_spec import build_meta_model, get_train_spec
from torchtitan.tools.launch import report_error
from torchtitan.tools.logging import init_logger, logger
from torchtitan.tools.parent_watch import exit_with_launcher
from torchtitan.tools.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling
from torchtitan.tools.utils import TORCH_DTYPES, GarbageCollection, cpu_has_native_bf16, resolve_mixed_precision_param


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm became non-finite; training stops before the bad update."""


class Trainer(Stateful):
    """Builds every component from the job config and runs the training loop."""

    def __init__(self, job_config: JobConfig):
        self.job_config = job_config
        self.step = 0
        self.ntokens_seen = 0

        self.device = dist_utils.init_distributed(job_config.comm, job_config.job.dump_folder)
        _resolve_auto_precision(job_config, self.device)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.parallel_dims = pd = ParallelDims.from_job_config(job_config, world_size)
        dist_utils.set_determinism(pd, self.device, job_config.debug)
        self.train_spec = spec = get_train_spec(job_config.model.name)

        self.tokenizer = spec.build_tokenizer_fn(job_config)

        # Model: built on meta, converted, parallelized, then materialized.
        self.model_args, model = build_meta_model(spec, job_config, self.tokenizer)
        validate_model(pd, self.model_args, job_config)
        converters = build_model_converters(job_config, pd)
        converters.convert(model)
        nparams, self.flops_per_token = self.model_args.get_nparams_and_flops(
            model, job_config.training.seq_len
        )
        disable_compile_caches_for_tp(job_config.compile, pd.tp_enabled)
        # Built ahead of the model split: under PP the schedule calls it for every microbatch.
        self.loss_fn = TokenNormalizedLoss(spec.build_loss_fn(job_config))
        self.pp_schedule = None
        self.pp_has_first_stage = self.pp_has_last_stage = True
        self.tied = None  # under PP: parameters tied across stages, one copy per stage kept equal
        if pd.pp_enabled:
            if spec.pipelining_fn is None:
                raise ConfigError(
                    f"--parallelism.pipeline_parallel_degree={pd.pp}: model {job_config.model.name} has no "
                    "pipelining_fn in its TrainSpec; set it to 1"
                )
            (self.pp_schedule, self.model_parts, self.pp_has_first_stage, self.pp_has_last_stage,
             self.tied) = spec.pipelining_fn(model, pd, job_config, self.device, spec.parallelize_fn, self.loss_fn)
        else:
            self.model_parts = [spec.parallelize_fn(model, pd, job_config)]
        del model
        for part in self.model_parts:
            part.to_empty(device=self.device)
            with torch.no_grad():
                part.init_weights(buffer_device=None)
            part.to(dtype=TORCH_DTYPES[job_config.training.dtype])
            part.train()

        # Data (after the model, whose layout checks are cheaper): partitioned over the data-parallel dims.
        self.dataloader = spec.build_dataloader_fn(
            pd.dp_world_size, pd.dp_rank(), self.tokenizer, job_config
        )
        self.optimizers = spec.build_optimizers_fn(self.model_parts, job_config.optimizer, pd)
        self.lr_schedulers = spec.build_lr_schedulers_fn(
            self.optimizers, job_config.lr_scheduler, job_config.training.steps
        )
        self.optimizers.register_step_post_hook(lambda *_: converters.post_optimizer_hook(self.model_parts))
        sd_adapter = (
            spec.state_dict_adapter(self.model_args, job_config.model.hf_assets_path)
            if spec.state_dict_adapter
            else None
        )
        self.checkpointer = CheckpointManager(
            dataloader=self.dataloader,
            model_parts=self.model_parts,
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={"train_state": self},
            checkpoint_config=job_config.checkpoint,
            sd_adapter=sd_adapter,
            base_folder=job_config.job.dump_folder,
            hf_assets_path=job_config.model.hf_assets_path,
        )

        tc = job_config.training
        self.grad_accum_steps = gradient_accumulation_steps(tc, pd.dp_world_size)
        global_batch = self.grad_accum_steps * tc.local_batch_size * pd.dp_world_size
        self.autocast = _autocast_context(job_config, pd, self.device)
        self.cp = build_context_parallel(pd, job_config, self.device.type)
        self.gc_handler = GarbageCollection(tc.gc_freq, tc.gc_debug)
        self.metrics = build_metrics_processor(
            job_config, pd, self.flops_per_token, self.device, _global_rank() == 0
        )
        self.validator = build_validator_for(
            spec, job_config, pd, self.tokenizer, self.loss_fn.loss_fn, self.metrics, self.device, self.autocast
        )
        logger.info(
            f"device {self.device}, world size {world_size}, model {job_config.model.name}/"
            f"{job_config.model.flavor}: {nparams:,} params, {self.flops_per_token:,} FLOPs/token; "
            f"local batch {tc.local_batch_size}, global batch {global_batch} sequences, "
            f"grad accumulation {self.grad_accum_steps}, seq len {tc.seq_len}, steps {tc.steps}"
        )

    # ---- Stateful: the train_state stored in checkpoints ----
    def state_dict(self) -> dict:
        return {
            "step": torch.tensor(self.step),
            "ntokens_seen": torch.tensor(self.ntokens_seen),
            "rng_state": torch.get_rng_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.step = int(state_dict["step"])
        self.ntokens_seen = int(state_dict["ntokens_seen"])
        torch.set_rng_state(state_dict["rng_state"])

    # ---- the loop ----
    def next_microbatches(self, data_iter: Iterator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Pull this step's microbatches, timing the data loading."""
        start = time.perf_counter()
        batches = []
        for _ in range(self.grad_accum_steps):
            input_dict, labels = next(data_iter)
            batches.append((input_dict["input"].to(self.device), labels.to(self.device)))
        self.metrics.data_loading_times.append(time.perf_counter() - start)
        return batches

    def train_context(self, seq_len: int | None = None) -> contextlib.ExitStack:
        """The contexts one forward (+ backward) runs in: autocast, loss parallel (the loss and its backward
        need it), and under CP the RoPE table of this rank's true positions in sequences of `seq_len`
        (default `training.seq_len`) tokens."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast)
        stack.enter_context(dist_utils.loss_parallel_context(self.parallel_dims))
        stack.enter_context(rope_context(self.cp, self.model_parts, seq_len or self.job_config.training.seq_len))
        return stack

    def forward_backward_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one local batch (the pipeline schedule under PP, its microbatches
        included). Returns the detached token-normalized loss; 0 on ranks without the last PP stage."""
        with self.train_context():
            if self.pp_schedule is not None:
                losses: list[torch.Tensor] | None = [] if self.pp_has_last_stage else None
                args = (inputs,) if self.pp_has_first_stage else ()
                self.pp_schedule.step(*args, target=labels if self.pp_has_last_stage else None, losses=losses)
                loss = torch.stack([_full(x) for x in losses]).sum() if losses else torch.zeros(())
            else:
                loss = self.loss_fn(self.model_parts[0](inputs), labels)
                loss.backward()
        return _full(loss.detach()).to(self.device)

    @torch.no_grad()
    def eval_loss(self, model_parts: list[nn.Module], inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Validation's forward: this rank's loss summed over the batch's label tokens, through the same CP
        sharding and PP schedule (its eval) as training; under PP shared from the last stage."""
        seq_len = inputs.shape[1]
        if self.cp is not None:
            inputs, labels = self.cp.shard(inputs, labels)
        with self.train_context(seq_len):
            if self.pp_schedule is None:
                return _full(self.loss_fn.loss_fn(model_parts[0](inputs), labels))
            self.loss_fn.global_tokens = 1  # a sum; the next train step sets its own count again
            losses: list[torch.Tensor] | None = [] if self.pp_has_last_stage else None
            args = (inputs,) if self.pp_has_first_stage else ()
            self.pp_schedule.eval(*args, target=labels if self.pp_has_last_stage else None, losses=losses)
        loss = torch.stack([_full(x) for x in losses]).sum() if losses else torch.zeros((), device=self.device)
        return torch.tensor(dist_utils.dist_sum(loss.to(self.device), self.parallel_dims.get_mesh("pp")), dtype=torch.float64)

    def train_step(self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One optimizer step over `grad_accum_steps` microbatches; loss normalized by global tokens."""
        pd = self.parallel_dims
        self.optimizers.zero_grad()
        loss_mesh = pd.get_mesh("dp_cp")
        if self.cp is not None:  # each CP rank keeps its share of every sequence; tokens counted after
            microbatches = [self.cp.shard(inputs, labels) for inputs, labels in microbatches]
        local_tokens = sum(int((labels != -100).sum()) for _, labels in microbatches)
        global_tokens = int(dist_utils.dist_sum(local_tokens, loss_mesh))
        self.loss_fn.global_tokens = global_tokens
        loss_sum = torch.zeros((), device=self.device)
        # Without PP, gradients are reduced once, after the last microbatch (PP schedules do it per step).
        sync = None if self.pp_schedule else getattr(self.model_parts[0], "set_requires_gradient_sync", None)
        for i, (inputs, labels) in enumerate(microbatches):
            if sync is not None:
                sync(i == len(microbatches) - 1)
            loss_sum += self.forward_backward_step(inputs, labels)
        if self.tied is not None:
            self.tied.sync_grads()
        grad_norm = dist_utils.clip_grad_norm_(
            [p for m in self.model_parts for p in m.parameters()],
            self.job_config.training.max_norm,
            pp_mesh=pd.get_mesh("pp"),
            uncounted=self.tied.uncounted() if self.tied is not None else (),
        )
        if not torch.isfinite(grad_norm):
            raise TrainingDivergedError(
                f"step {self.step}: gradient norm is {grad_norm.item()} (loss {loss_sum.item()}); "
                "training stopped before this update: lower optimizer.lr or training.max_norm, "
                "or resume from the last checkpoint"
            )
        lr = self.lr_schedulers.last_lr()
        self.checkpointer.maybe_wait_for_staging()
        self.optimizers.step()
        self.lr_schedulers.step()

        self.ntokens_seen += global_tokens
        self.metrics.ntokens_since_last_log += local_tokens
        if self.metrics.should_log(self.step):
            if pd.pp_enabled:  # the loss lives on the last stage: make it every PP rank's
                loss_sum = torch.tensor(dist_utils.dist_sum(loss_sum, pd.get_mesh("pp")))
            global_avg = dist_utils.dist_sum(loss_sum, loss_mesh)
            local_mean = loss_sum * global_tokens / max(local_tokens, 1)
            global_max = dist_utils.dist_max(local_mean, loss_mesh)
            self.metrics.log(
                self.step,
                global_avg_loss=global_avg,
                global_max_loss=global_max,
                grad_norm=grad_norm.item(),
                lr=lr,
                ntokens_seen=self.ntokens_seen,
            )

    def train(self) -> None:
        """Run from the loaded step to `training.steps`, checkpointing as configured."""
        jc = self.job_config
        self.checkpointer.load(step=jc.checkpoint.load_step)
        if jc.checkpoint.create_seed_checkpoint:
            validate_seed_checkpoint(self.parallel_dims)
            self.checkpointer.save_seed()
            return
        if self.tied is not None:  # initialized (or loaded) per stage: the first stage's copy wins
            self.tied.sync_weights()
        first_step = self.step + 1
        logger.info(f"training from step {first_step} to {jc.training.steps}")
        data_iter = iter(self.dataloader)
        self.metrics.reset_timers(self.step)
        with (
            maybe_enable_profiling(jc.profiling, jc.job.dump_folder, self.step) as profiler,
            maybe_enable_memory_snapshot(jc.profiling, jc.job.dump_folder, self.step) as snapshot,
        ):
            while self.step < jc.training.steps:
                self.step += 1
                self.gc_handler.run(self.step)
                try:
                    microbatches = self.next_microbatches(data_iter)
                except DataExhaustedError:
                    logger.info(f"dataset exhausted before step {self.step}; ending training")
                    self.step -= 1
                    break
                self.train_step(microbatches)
                self.checkpointer.save(self.step, last_step=self.step == jc.training.steps)
                if self.validator is not None and self.validator.should_validate(self.step):
                    self.validator.validate(self.model_parts, self.step, self.eval_loss)
                if profiler is not None:
                    profiler.step()
                if snapshot is not None:
                    snapshot.step()
                if self.step == first_step:  # also after a resume: the first step this process ran
                    dist_utils.set_pg_timeouts(jc.comm.train_timeout_seconds, self.parallel_dims)
        logger.info("training finished")

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()
        self.gc_handler.close()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A loss as a plain tensor (under loss parallel it is a replicated DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _resolve_auto_precision(job_config: JobConfig, device: torch.device) -> None:
    """Replace `training.mixed_precision_param = "auto"` by the dtype this device runs fastest, in place,
    so FSDP, autocast and the saved config all see the choice; explicit values are left alone."""
    training = job_config.training
    if training.mixed_precision_param != "auto":
        return
    training.mixed_precision_param = resolve_mixed_precision_param("auto", device.type)
    where = device.type
    if device.type == "cpu":
        native = "with" if cpu_has_native_bf16() else "without"
        where = f"a CPU with {torch.backends.cpu.get_cpu_capability()}, {native} native bf16"
    logger.info(
        f"training.mixed_precision_param=auto -> {training.mixed_precision_param} on {where} "
        "(set it explicitly to override)"
    )


def _autocast_context(job_config: JobConfig, pd: ParallelDims, device: torch.device):
    """Autocast to `mixed_precision_param` when FSDP (which casts parameters itself) is off."""
    dtype = TORCH_DTYPES[job_config.training.mixed_precision_param]
    if dtype != torch.float32 and device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            f"training.mixed_precision_param={job_config.training.mixed_precision_param} on a CPU without "
            f"native bf16 ({torch.backends.cpu.get_cpu_capability()}) runs ~30x slower than float32; "
            "pass --training.mixed_precision_param float32"
        )
    if pd.fsdp_enabled or dtype == torch.float32 or job_config.training.dtype != "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse the config, train, and always shut down cleanly."""
    init_logger()
    exit_with_launcher()
    trainer = None
    clean = False
    try:
        job_config = ConfigManager().parse_args(argv)
        if job_config.comm.mode == "fake_backend":
            from torchtitan.distributed.fake_backend import dry_run

            dry_run(job_config)
            return 0
        if job_config.memory_estimation.enable:
            from torchtitan.tools.memory_estimation import log_memory_estimate

            log_memory_estimate(job_config, int(os.environ.get("WORLD_SIZE", "1")))
        trainer = Trainer(job_config)
        trainer.train()
        clean = True
    except ConfigError as e:
        report_error(str(e))
        return 2
    except TrainingDivergedError as e:
        logger.error(str(e))
        report_error(str(e))
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        dist_utils.shutdown(clean)
    return 0


if __name__ == "__main__":
    dist_utils.exit_process(main())
