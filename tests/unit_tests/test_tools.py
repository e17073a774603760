"""tools/utils.py (peak FLOPS, device info, GC, colours) and tools/profiling.py."""

import gc
import json
import logging
import os
from dataclasses import replace

import pytest
import torch

from torchtitan.config import ConfigError, JobConfig
from torchtitan.tools import utils
from torchtitan.tools.logging import init_logger, logger
from torchtitan.tools.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling


@pytest.mark.parametrize(
    "name, flops",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA B200", 2.25e15),
        ("NVIDIA GB200", 2.5e15),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("AMD Instinct MI300X", 1307e12),
        ("AMD Instinct MI325X", 1307e12),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_gpu_peak_flops_table(name, flops):
    assert utils.gpu_peak_flops(name) == flops


def test_peak_flops_cpu_uses_configured_value():
    cpu = torch.device("cpu")
    assert utils.get_peak_flops(cpu) is None
    assert utils.get_peak_flops(cpu, cpu_peak_tflops=2.5) == 2.5e12


def test_peak_flops_unknown_gpu_warns(monkeypatch, captured_logs):
    monkeypatch.setattr(utils, "device_name", lambda device: "Mystery GPU 9000")
    assert utils.get_peak_flops(torch.device("cuda", 0)) is None
    assert "Peak FLOPS of device 'Mystery GPU 9000' is unknown; MFU will not be reported" in captured_logs.text


def test_device_info():
    if torch.cuda.is_available():
        assert utils.get_device_info() == ("cuda", torch.cuda)
    else:
        assert utils.get_device_info() == ("cpu", torch.cpu)
    assert isinstance(utils.device_name(torch.device("cpu")), str) and utils.device_name(torch.device("cpu"))


def test_colors():
    assert utils.Color().red == "\033[31m" and utils.Color().reset == "\033[39m"
    assert utils.NO_COLOR.red == "" and utils.NO_COLOR.reset == ""


def test_set_default_dtype():
    with utils.set_default_dtype(torch.bfloat16):
        assert torch.ones(1).dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32


def test_garbage_collection(monkeypatch):
    calls = []
    monkeypatch.setattr(utils.gc, "collect", lambda generation=2: calls.append(generation))
    handler = utils.GarbageCollection(gc_freq=3)
    try:
        assert not gc.isenabled()
        assert calls == [1]  # initial collection
        for step in range(1, 8):
            handler.run(step)
        assert calls == [1, 1, 1]  # steps 3 and 6
    finally:
        handler.close()
    assert gc.isenabled()


def test_garbage_collection_debug_collects_every_step(monkeypatch):
    calls = []
    monkeypatch.setattr(utils.gc, "collect", lambda generation=2: calls.append(generation))
    monkeypatch.setattr("torch.utils.viz._cycles.warn_tensor_cycles", lambda: None)
    handler = utils.GarbageCollection(gc_freq=100, debug=True)
    try:
        for step in range(1, 4):
            handler.run(step)
    finally:
        handler.close()
    assert calls == [1, 2, 2, 2]


def test_garbage_collection_rejects_bad_freq():
    with pytest.raises(ValueError, match="gc_freq must be positive, got 0"):
        utils.GarbageCollection(gc_freq=0)


def _profiling(**overrides):
    return replace(JobConfig().profiling, **overrides)


def test_profiling_disabled_yields_none(tmp_path):
    with maybe_enable_profiling(_profiling(), str(tmp_path)) as profiler:
        assert profiler is None
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("global_step, expected", [(0, ["iteration_3", "iteration_6"]), (3, ["iteration_6"])])
def test_profiling_writes_traces_every_freq_steps(tmp_path, global_step, expected):
    cfg = _profiling(
        enable_profiling=True, profile_freq=3, profiler_warmup=1, profiler_active=1, save_traces_folder="tr"
    )
    x = torch.randn(8, 8)
    with maybe_enable_profiling(cfg, str(tmp_path), global_step=global_step) as profiler:
        for _ in range(6 - global_step):
            x = torch.tanh(x @ x)
            profiler.step()
    assert sorted(os.listdir(tmp_path / "tr")) == expected
    with open(tmp_path / "tr" / expected[-1] / "rank0_trace.json") as f:
        trace = json.load(f)
    assert any("aten::mm" in event.get("name", "") for event in trace["traceEvents"])


def test_profiling_rejects_inconsistent_schedule(tmp_path):
    cfg = _profiling(enable_profiling=True, profile_freq=3, profiler_warmup=3, profiler_active=1)
    with pytest.raises(ConfigError, match=r"profiling.profile_freq=3 must be >= profiler_warmup \(3\)"):
        with maybe_enable_profiling(cfg, str(tmp_path)):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_memory_snapshot_is_a_warning_on_cpu(tmp_path, captured_logs):
    with maybe_enable_memory_snapshot(_profiling(enable_memory_snapshot=True), str(tmp_path)) as snapshotter:
        assert snapshotter is None
    assert "profiling.enable_memory_snapshot needs a CUDA device; no memory snapshots on CPU" in captured_logs.text
    with maybe_enable_memory_snapshot(_profiling(), str(tmp_path)) as snapshotter:
        assert snapshotter is None
    assert os.listdir(tmp_path) == []


def test_log_lines_carry_no_rank_prefix_of_their_own(monkeypatch):
    """torchrun (`--role rank --tee 3`) already prefixes `[rankN]:`; our format must not add another."""
    monkeypatch.setenv("RANK", "3")
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        init_logger()
        record = logging.LogRecord("torchtitan", logging.INFO, __file__, 1, "hello", None, None)
        line = logger.handlers[0].format(record)
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    assert line.startswith("[titan] ") and line.endswith(" - INFO - hello"), line
