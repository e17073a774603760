"""Test-wide settings: nothing may reach the network; torchtitan logs reach caplog."""

import logging
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _torchtitan_logs_reach_caplog():
    """`init_logger()` stops propagation for real runs; tests need records to reach caplog."""
    logger = logging.getLogger("torchtitan")
    saved = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = saved
