"""Device info, the peak-FLOPS table used for MFU, the GC handler, console colours."""

import contextlib
import gc
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from torchtitan.tools.logging import get_logger
from torchtitan.tools.logging import logger as root_logger

logger = get_logger(__name__)


# Config dtype names -> torch dtypes; the one table for training, mixed precision and export dtypes.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



def cpu_has_native_bf16(capability: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively: AVX-512 with the BF16 extension or AMX tiles.

    `capability` is `torch.backends.cpu.get_cpu_capability()` (default: this CPU's); it only says
    "AVX512", so the BF16/AMX extensions are read from cpuinfo.
    """
    capability = capability or torch.backends.cpu.get_cpu_capability()
    return capability == "AVX512" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_mixed_precision_param(value: str, device_type: str, native_bf16: bool | None = None) -> str:
    """The compute dtype name for `training.mixed_precision_param`: an explicit value as given; "auto"
    gives bfloat16 on GPUs and on CPUs with native bf16 (`native_bf16`, default: this CPU's), else
    float32, which on AVX2 CPUs runs the default job many times faster than bf16 autocast."""
    if value != "auto":
        return value
    if device_type != "cpu":
        return "bfloat16"
    return "bfloat16" if (cpu_has_native_bf16() if native_bf16 is None else native_bf16) else "float32"

def get_device_info() -> tuple[str, ModuleType]:
    """The accelerator type and its torch module: ("cuda", torch.cuda) when CUDA is usable, else ("cpu", torch.cpu)."""
    if torch.cuda.is_available():
        return "cuda", torch.cuda
    return "cpu", torch.cpu


def device_name(device: torch.device) -> str:
    """Human-readable name of `device`: the GPU product name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets. Checked in
# order against the upper-cased device name, so more specific names come before their prefixes.
_GPU_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIE", 756e12),
    ("H100", 989e12),  # SXM ("H100 80GB HBM3")
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("MI355X", 2.5e15),
    ("MI350X", 2.3e15),
    ("MI325X", 1307e12),
    ("MI300X", 1307e12),
    ("MI300A", 981e12),
    ("MI250X", 383e12),
)


def gpu_peak_flops(name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU called `name` (as torch.cuda.get_device_name reports it), or None."""
    upper = name.upper()
    for key, flops in _GPU_PEAK_BF16_FLOPS:
        if key in upper:
            return flops
    return None


def get_peak_flops(device: torch.device, cpu_peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s for MFU on `device`.

    None (no MFU) for an unknown GPU (with a warning) or for a CPU when `cpu_peak_tflops` is not set.
    """
    if device.type == "cpu":
        return None if cpu_peak_tflops is None else cpu_peak_tflops * 1e12
    name = device_name(device)
    flops = gpu_peak_flops(name)
    if flops is None:
        logger.warning(f"Peak FLOPS of device '{name}' is unknown; MFU will not be reported")
    return flops


@dataclass(frozen=True)
class Color:
    """ANSI escape codes for the console metrics line."""

    black: str = "\033[30m"
    red: str = "\033[31m"
    green: str = "\033[32m"
    yellow: str = "\033[33m"
    blue: str = "\033[34m"
    magenta: str = "\033[35m"
    cyan: str = "\033[36m"
    white: str = "\033[37m"
    orange: str = "\033[38;2;180;60;0m"
    turquoise: str = "\033[38;2;54;234;195m"
    reset: str = "\033[39m"


NO_COLOR = Color(**{name: "" for name in Color.__dataclass_fields__})


def console_colors(disabled: bool, stream: Any = None) -> Color:
    """ANSI colors only where a person reads them: `stream` (default: where torchtitan logs) is a terminal,
    `NO_COLOR` (https://no-color.org) is unset or empty, and `metrics.disable_color_printing` is off.
    Log files and Slurm `.out` files therefore get plain text."""
    if stream is None:
        handlers = [h for h in root_logger.handlers if isinstance(h, logging.StreamHandler)]
        stream = handlers[0].stream if handlers else sys.stderr
    if disabled or os.environ.get("NO_COLOR") or not _is_terminal(stream):
        return NO_COLOR
    return Color()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class GarbageCollection:
    """Manual GC: automatic collection off, a generation-1 collection every `gc_freq` steps.

    With `debug`, a full collection runs every step and reference cycles holding tensors are warned about,
    to find the cycle that makes memory grow.
    """

    def __init__(self, gc_freq: int = 50, debug: bool = False) -> None:
        if gc_freq <= 0:
            raise ValueError(f"gc_freq must be positive, got {gc_freq}")
        self.gc_freq = gc_freq
        self.debug = debug
        gc.disable()
        self.collect("Initial GC collection")
        if debug:
            from torch.utils.viz._cycles import warn_tensor_cycles

            warn_tensor_cycles()

    def run(self, step: int) -> None:
        """Call once per training step (1-based)."""
        if self.debug:
            self.collect("Debug GC collection", generation=2)
        elif step > 1 and step % self.gc_freq == 0:
            self.collect("Periodic GC collection")

    def close(self) -> None:
        """Give control back to Python's automatic GC."""
        gc.enable()

    @staticmethod
    def collect(reason: str, generation: int = 1) -> None:
        begin = time.monotonic()
        gc.collect(generation)
        logger.info(f"[GC] {reason} took {time.monotonic() - begin:.2f} seconds")


@contextlib.contextmanager
def set_default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default floating dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def total_ram_bytes() -> int:
    """Physical memory of this host in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
