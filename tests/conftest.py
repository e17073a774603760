"""Test-wide settings: nothing may reach the network; torchtitan logs reach caplog."""

import logging
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torchtitan.builtins  # noqa: E402, F401  (tests, like the trainer, see the built-in models and converters)


@pytest.fixture(autouse=True)
def _torchtitan_logs_reach_caplog():
    """`init_logger()` stops propagation for real runs; tests need records to reach caplog."""
    logger = logging.getLogger("torchtitan")
    saved = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = saved


@pytest.fixture
def captured_logs(caplog):
    """caplog recording torchtitan's records at INFO and above."""
    caplog.set_level(logging.INFO, logger="torchtitan")
    return caplog


@pytest.fixture
def captured_warnings(caplog):
    """caplog recording torchtitan's warnings and errors only."""
    caplog.set_level(logging.WARNING, logger="torchtitan")
    return caplog
