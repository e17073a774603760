"""Training metrics: console line, metrics.jsonl, TensorBoard and Weights & Biases."""

import json
import os
import resource
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch
import torch.distributed as dist

from torchtitan.config import to_dict
from torchtitan.tools.logging import get_logger
from torchtitan.tools.utils import console_colors, device_name, get_peak_flops, total_ram_bytes

logger = get_logger(__name__)

__all__ = ["DeviceMemoryMonitor", "DeviceMemStats", "MetricsProcessor", "build_metrics_processor"]

_GIB = 1024**3
_now = time.perf_counter  # module-level so tests can drive the clock


@dataclass(frozen=True)
class DeviceMemStats:
    max_active_gib: float
    max_active_pct: float
    max_reserved_gib: float
    max_reserved_pct: float
    num_alloc_retries: int
    num_ooms: int


class DeviceMemoryMonitor:
    """Peak memory since the last reset: the CUDA caching allocator's peaks on GPU, the process's peak RSS on CPU.

    The CPU peak RSS cannot be reset, so on CPU it is the peak since the process started.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.device_name = device_name(device)
        if device.type == "cuda":
            self.capacity_bytes = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.empty_cache()
        else:
            self.capacity_bytes = total_ram_bytes()
        self.capacity_gib = self.capacity_bytes / _GIB

    def _pct(self, nbytes: float) -> float:
        return 100.0 * nbytes / self.capacity_bytes

    def get_peak_stats(self) -> DeviceMemStats:
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            active = stats.get("active_bytes.all.peak", 0)
            reserved = stats.get("reserved_bytes.all.peak", 0)
            retries, ooms = stats.get("num_alloc_retries", 0), stats.get("num_ooms", 0)
        else:
            active = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            retries = ooms = 0
        return DeviceMemStats(
            max_active_gib=active / _GIB,
            max_active_pct=self._pct(active),
            max_reserved_gib=reserved / _GIB,
            max_reserved_pct=self._pct(reserved),
            num_alloc_retries=retries,
            num_ooms=ooms,
        )

    def reset_peak_stats(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


class _JsonlWriter:
    """Appends one JSON object per record (so a resumed run continues the same file), flushed per line."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _TensorBoardWriter:
    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir, max_queue=1000)
        logger.info(f"TensorBoard metrics go to {log_dir}")

    def write(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        self._writer.close()


class _WandbWriter:
    def __init__(self, job_config: Any, log_dir: str) -> None:
        import wandb

        os.makedirs(log_dir, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "torchtitan"),
            name=os.environ.get("WANDB_RUN_NAME"),
            dir=log_dir,
            config=to_dict(job_config),
        )
        logger.info(f"Weights & Biases run {self.run.name!r} logging under {self.run.dir}")

    def write(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsProcessor:
    """Turns per-step training numbers into the console line and the metric files.

    The trainer adds each microbatch's local label-token count to `ntokens_since_last_log` and each data
    fetch's seconds to `data_loading_times`, asks `should_log(step)`, and calls `log(...)`, which resets
    both. Files (metrics.jsonl, TensorBoard, W&B) are written by the logging rank only; with
    `metrics.save_for_all_ranks` every other rank writes `metrics_rank{r}.jsonl` and a TensorBoard
    `rank_{r}` folder too (W&B stays on the logging rank). The console line is printed on every rank.
    """

    def __init__(
        self,
        job_config: Any,
        parallel_dims: Any,
        num_flops_per_token: int,
        device: torch.device,
        rank_is_logging: bool,
    ) -> None:
        mcfg = job_config.metrics
        self.log_freq = mcfg.log_freq
        self.last_step = job_config.training.steps
        self.num_flops_per_token = num_flops_per_token
        # tokens are counted per data-parallel rank; the model-parallel ranks of that replica share them
        self.devices_per_replica = parallel_dims.non_data_parallel_size if parallel_dims is not None else 1
        self.color = console_colors(mcfg.disable_color_printing)
        self.memory_monitor = DeviceMemoryMonitor(device)
        self.peak_flops = get_peak_flops(device, mcfg.cpu_peak_tflops)

        self.ntokens_since_last_log = 0
        self.data_loading_times: list[float] = []
        self._local_ntokens_seen = 0
        self.time_start = _now()
        self.reset_timers(0)

        rank = _rank()
        dump_folder = job_config.job.dump_folder
        writes = rank_is_logging or mcfg.save_for_all_ranks
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if writes:
            name = "metrics.jsonl" if rank_is_logging else f"metrics_rank{rank}.jsonl"
            self._jsonl = _JsonlWriter(os.path.join(dump_folder, name))
        if writes and mcfg.enable_tensorboard:
            tb_dir = os.path.join(dump_folder, mcfg.save_tb_folder, datetime.now().strftime("%Y%m%d-%H%M"))
            if mcfg.save_for_all_ranks:
                tb_dir = os.path.join(tb_dir, f"rank_{rank}")
            self._tb = _TensorBoardWriter(tb_dir)
        if rank_is_logging and mcfg.enable_wandb:
            self._wandb = _WandbWriter(job_config, dump_folder)

    @property
    def jsonl_path(self) -> str | None:
        return self._jsonl.path if self._jsonl else None

    @property
    def tb_log_dir(self) -> str | None:
        return self._tb.log_dir if self._tb else None

    def reset_timers(self, step: int) -> None:
        """Start the next measurement window at `step` (call right before the loop, e.g. after resuming)."""
        self.time_last_log = _now()
        self.last_logged_step = step
        self.ntokens_since_last_log = 0
        self.data_loading_times.clear()
        self.memory_monitor.reset_peak_stats()

    def should_log(self, step: int) -> bool:
        """Log at step 1, every `metrics.log_freq` steps, and at the last step."""
        return step == 1 or step % self.log_freq == 0 or step == self.last_step

    def log(
        self,
        step: int,
        global_avg_loss: float | torch.Tensor,
        global_max_loss: float | torch.Tensor,
        grad_norm: float | torch.Tensor,
        lr: float,
        ntokens_seen: int | None = None,
        extra: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Report the window since the previous log; returns the metrics.jsonl record.

        `ntokens_seen` is the run's token count to report (e.g. the global count including resumed steps);
        without it, the tokens this processor counted on this rank are reported.
        """
        time_delta = _now() - self.time_last_log
        steps = max(1, step - self.last_logged_step)
        tps = self.ntokens_since_last_log / (time_delta * self.devices_per_replica)
        tflops = self.num_flops_per_token * tps / 1e12
        mfu = 100 * self.num_flops_per_token * tps / self.peak_flops if self.peak_flops else None
        data_loading = sum(self.data_loading_times)
        mem = self.memory_monitor.get_peak_stats()
        self._local_ntokens_seen += self.ntokens_since_last_log
        loss, max_loss, grad_norm = float(global_avg_loss), float(global_max_loss), float(grad_norm)

        record: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "max_loss": max_loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tps": tps,
            "tflops": tflops,
            "mfu": mfu,
            "memory_gib": mem.max_reserved_gib,
            "memory_pct": mem.max_reserved_pct,
            "n_tokens_seen": ntokens_seen if ntokens_seen is not None else self._local_ntokens_seen,
            "time_s": _now() - self.time_start,
            "step_time_s": time_delta / steps,
            "data_loading_s": data_loading / steps,
            "data_loading_pct": 100 * data_loading / time_delta,
            **(extra or {}),
        }
        scalars = {
            "loss_metrics/global_avg_loss": loss,
            "loss_metrics/global_max_loss": max_loss,
            "grad_norm": grad_norm,
            "throughput(tps)": tps,
            "tflops": tflops,
            "time_metrics/end_to_end(s)": record["step_time_s"],
            "time_metrics/data_loading(s)": record["data_loading_s"],
            "time_metrics/data_loading(%)": record["data_loading_pct"],
            "memory/max_active(GiB)": mem.max_active_gib,
            "memory/max_active(%)": mem.max_active_pct,
            "memory/max_reserved(GiB)": mem.max_reserved_gib,
            "memory/max_reserved(%)": mem.max_reserved_pct,
            "memory/num_alloc_retries": mem.num_alloc_retries,
            "memory/num_ooms": mem.num_ooms,
            "n_tokens_seen": record["n_tokens_seen"],
            "lr": lr,
            **(extra or {}),
        }
        if mfu is not None:
            scalars["mfu(%)"] = mfu
        self._write(record, scalars, step)
        logger.info(self._console_line(step, loss, grad_norm, mem, tps, tflops, mfu))
        self.reset_timers(step)
        return record

    def log_validation(
        self, step: int, loss: float, perplexity: float, n_tokens: int, time_s: float
    ) -> dict[str, Any]:
        """Report a validation result for training step `step` (`time_s`: how long the validation took);
        returns the metrics.jsonl record, which carries `"split": "validation"`."""
        mem = self.memory_monitor.get_peak_stats()
        record = {
            "split": "validation",
            "step": step,
            "loss": loss,
            "perplexity": perplexity,
            "n_tokens": n_tokens,
            "time_s": time_s,
            "memory_gib": mem.max_reserved_gib,
        }
        scalars = {
            "validation_metrics/loss": loss,
            "validation_metrics/perplexity": perplexity,
            "validation_metrics/n_tokens": n_tokens,
            "validation_metrics/time(s)": time_s,
            "validation_metrics/memory/max_reserved(GiB)": mem.max_reserved_gib,
        }
        self._write(record, scalars, step)
        c = self.color
        logger.info(
            f"{c.yellow}validate  step: {step:2}  {c.green}loss: {loss:.4f}  {c.orange}perplexity: {perplexity:.1f}  "
            f"{c.blue}tokens: {n_tokens:,}  {c.cyan}time: {time_s:.1f}s{c.reset}"
        )
        return record

    def _write(self, record: dict[str, Any], scalars: dict[str, float], step: int) -> None:
        if self._jsonl:
            self._jsonl.write(record)
        if self._tb:
            self._tb.write(scalars, step)
        if self._wandb:
            self._wandb.write(scalars, step)

    def _console_line(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        mem: DeviceMemStats,
        tps: float,
        tflops: float,
        mfu: float | None,
    ) -> str:
        c = self.color
        mfu_text = f"{mfu:.2f}%" if mfu is not None else "n/a"
        return (
            f"{c.red}step: {step:2}  {c.green}loss: {loss:8.5f}  {c.orange}grad_norm: {grad_norm:7.4f}  "
            f"{c.turquoise}memory: {mem.max_reserved_gib:5.2f}GiB({mem.max_reserved_pct:.2f}%)  "
            f"{c.blue}tps: {round(tps):,}  {c.cyan}tflops: {tflops:,.2f}  {c.magenta}mfu: {mfu_text}{c.reset}"
        )

    def close(self) -> None:
        """Flush and close every writer (safe to call twice)."""
        for writer in (self._jsonl, self._tb, self._wandb):
            if writer:
                writer.close()
        self._jsonl = self._tb = self._wandb = None


def build_metrics_processor(
    job_config: Any,
    parallel_dims: Any,
    num_flops_per_token: int,
    device: torch.device,
    is_logging_rank: bool,
) -> MetricsProcessor:
    """The MetricsProcessor for this rank (see its docstring for who writes what)."""
    return MetricsProcessor(job_config, parallel_dims, num_flops_per_token, device, is_logging_rank)
