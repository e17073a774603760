"""Inductor caches are off exactly when compiled graphs would carry tensor-parallel collectives."""

import pytest
import torch._inductor.config as inductor_config

from torchtitan.config import JobConfig
from torchtitan.distributed.compile import disable_compile_caches_for_tp


@pytest.mark.parametrize(
    ("enable", "tp_enabled", "disabled"),
    [(True, True, True), (True, False, False), (False, True, False)],
)
def test_caches_disabled_only_for_compiled_tp(enable, tp_enabled, disabled):
    # torch's config modules keep their values outside the module __dict__, so pytest's monkeypatch
    # would delete the attribute on undo; their own patch() restores it.
    before = inductor_config.force_disable_caches
    with inductor_config.patch(force_disable_caches=False):
        compile_config = JobConfig().compile
        compile_config.enable = enable
        disable_compile_caches_for_tp(compile_config, tp_enabled)
        assert inductor_config.force_disable_caches is disabled
    assert inductor_config.force_disable_caches is before
