"""Logging setup shared by every module: `logger = get_logger(__name__)`, `init_logger()` once in main."""

import logging

_ROOT = "torchtitan"
logger = logging.getLogger(_ROOT)


def get_logger(name: str) -> logging.Logger:
    """A module logger under the torchtitan hierarchy (so `init_logger` configures it)."""
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def init_logger(level: int = logging.INFO) -> None:
    """Configure torchtitan's loggers once: one stream handler. The launchers' torchrun (`--role rank
    --tee 3`) prefixes each rank's lines with `[rankN]:`, so the format carries no rank of its own."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[titan] %(asctime)s - %(levelname)s - %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
