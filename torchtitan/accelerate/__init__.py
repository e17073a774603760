"""Accelerate-style API: our parallel stack under a user's own training loop.

    from torchtitan.accelerate import Accelerator, TorchTitanPlugin

See docs/api.md. No dependency on the `accelerate` package.
"""

from torchtitan.accelerate.accelerator import AcceleratedOptimizer, AcceleratedScheduler, Accelerator
from torchtitan.accelerate.plugin import TorchTitanPlugin

__all__ = ["AcceleratedOptimizer", "AcceleratedScheduler", "Accelerator", "TorchTitanPlugin"]
