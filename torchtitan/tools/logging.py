"""Logging setup shared by every module: `logger = get_logger(__name__)`, `init_logger()` once in main."""

import logging
import os

_ROOT = "torchtitan"
logger = logging.getLogger(_ROOT)


def get_logger(name: str) -> logging.Logger:
    """A module logger under the torchtitan hierarchy (so `init_logger` configures it)."""
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def init_logger(level: int = logging.INFO) -> None:
    """Configure torchtitan's loggers once: one stream handler, rank-prefixed lines."""
    rank = os.environ.get("RANK")
    prefix = f"[rank{rank}]" if rank is not None else ""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{prefix}[titan] %(asctime)s - %(levelname)s - %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
