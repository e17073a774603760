"""torchtitan: a PyTorch-native platform for pre-training large language models.

`from torchtitan import JobConfig, Trainer` gives the configuration and the trainer for use from Python
(imported lazily, so `import torchtitan` stays light).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["JobConfig", "Trainer"]


def __getattr__(name: str) -> Any:
    if name == "JobConfig":
        from torchtitan.config import JobConfig

        return JobConfig
    if name == "Trainer":
        from torchtitan.train import Trainer

        return Trainer
    raise AttributeError(f"module 'torchtitan' has no attribute {name!r}")
