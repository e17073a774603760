"""training.mixed_precision_param = "auto": the run-time choice by device and CPU capability, and
explicit values always winning."""

import pytest
import torch

from torchtitan import train
from torchtitan.config import ConfigManager
from torchtitan.tools import utils

DEBUG_TOML = "torchtitan/models/llama3/train_configs/debug_model.toml"


@pytest.mark.parametrize(
    "device_type, native_bf16, expected",
    [("cpu", False, "float32"), ("cpu", True, "bfloat16"), ("cuda", False, "bfloat16"), ("cuda", True, "bfloat16")],
)
def test_auto_picks_by_device_and_native_bf16(device_type, native_bf16, expected):
    assert utils.resolve_mixed_precision_param("auto", device_type, native_bf16) == expected


@pytest.mark.parametrize("explicit", ["float32", "bfloat16"])
@pytest.mark.parametrize("device_type, native_bf16", [("cpu", False), ("cpu", True), ("cuda", False)])
def test_explicit_value_wins(explicit, device_type, native_bf16):
    assert utils.resolve_mixed_precision_param(explicit, device_type, native_bf16) == explicit


@pytest.mark.parametrize(
    "capability, avx512_bf16, amx, expected",
    [
        ("AVX2", True, True, False),  # the extensions count only with AVX-512 vectors
        ("AVX512", False, False, False),  # AVX-512 without BF16 (e.g. Skylake): bf16 is emulated
        ("AVX512", True, False, True),
        ("AVX512", False, True, True),
        ("DEFAULT", False, False, False),
    ],
)
def test_native_bf16_from_capability(monkeypatch, capability, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert utils.cpu_has_native_bf16(capability) is expected


@pytest.mark.parametrize("native_bf16, expected", [(False, "float32"), (True, "bfloat16")])
def test_default_job_resolves_auto_and_logs(monkeypatch, captured_logs, native_bf16, expected):
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda capability=None: native_bf16)
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda capability=None: native_bf16)
    job_config = ConfigManager().parse_args(["--job.config_file", DEBUG_TOML])
    assert job_config.training.mixed_precision_param == "auto"
    train._resolve_auto_precision(job_config, torch.device("cpu"))
    assert job_config.training.mixed_precision_param == expected
    lines = [r.getMessage() for r in captured_logs.records if "mixed_precision_param=auto" in r.getMessage()]
    assert len(lines) == 1 and f"-> {expected} on a " in lines[0], lines


@pytest.mark.parametrize("explicit", ["float32", "bfloat16"])
@pytest.mark.parametrize("native_bf16", [False, True])
def test_default_job_cli_value_wins(monkeypatch, captured_logs, explicit, native_bf16):
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda capability=None: native_bf16)
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda capability=None: native_bf16)
    job_config = ConfigManager().parse_args(
        ["--job.config_file", DEBUG_TOML, "--training.mixed_precision_param", explicit]
    )
    train._resolve_auto_precision(job_config, torch.device("cpu"))
    assert job_config.training.mixed_precision_param == explicit
    assert "mixed_precision_param=auto" not in captured_logs.text


def test_toml_value_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda capability=None: False)
    toml = tmp_path / "job.toml"
    toml.write_text(open(DEBUG_TOML).read().replace('mixed_precision_param = "auto"', 'mixed_precision_param = "bfloat16"'))
    job_config = ConfigManager().parse_args(["--job.config_file", str(toml)])
    train._resolve_auto_precision(job_config, torch.device("cpu"))
    assert job_config.training.mixed_precision_param == "bfloat16"

