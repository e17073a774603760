"""torchtitan compatibility: 0.2 TOMLs load silently, 0.1 names map with a warning, every repo TOML parses."""

import logging
import warnings
from pathlib import Path

import pytest

from torchtitan.config import ConfigError, ConfigManager, validation
from torchtitan.config.job_config import JobConfig
from torchtitan.config.schema import sections, tomllib

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "tests" / "assets" / "configs"


def messages(log) -> list[str]:
    return [r.getMessage() for r in log.records if r.levelno >= logging.WARNING]


def test_v02_fixture_covers_every_section():
    with open(CONFIGS / "titan_v02_all_sections.toml", "rb") as f:
        data = tomllib.load(f)

    def tables(table: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in table.items():
            if isinstance(v, dict):
                out |= {prefix + k} | tables(v, prefix + k + ".")
        return out

    assert tables(data) == set(sections(JobConfig))


@pytest.fixture
def schema_only(monkeypatch):
    """Some aliases here switch on features that are not built yet, which a run refuses in one line (see
    test_config.py). These tests check names and values only."""
    monkeypatch.setattr(validation, "NOT_BUILT", {})


def test_v02_fixture_features_are_all_built():
    """It switches on PP, validation, compile and Float8: all built, so it parses with the real NOT_BUILT table."""
    config = ConfigManager().parse_args(["--job.config_file", str(CONFIGS / "titan_v02_all_sections.toml")])
    assert config.parallelism.pipeline_parallel_degree == 2 and config.validation.enable


@pytest.mark.usefixtures("schema_only")
def test_v02_fixture_loads_with_zero_warnings(captured_warnings):
    fixture = ["--job.config_file", str(CONFIGS / "titan_v02_all_sections.toml")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = ConfigManager().parse_args(fixture)
    assert [str(w.message) for w in caught] == []
    assert messages(captured_warnings) == []
    assert config.training.dataloader.num_workers == 2
    assert config.training.dataloader.prefetch_factor == 2
    assert config.quantize.linear.float8.recipe_name == "rowwise"
    assert config.quantize.linear.float8.emulate is True
    assert config.parallelism.module_fqns_per_model_part == [
        ["tok_embeddings", "layers.0"],
        ["layers.1", "norm", "output"],
    ]
    assert config.checkpoint.exclude_from_loading == ["dataloader", "lr_scheduler"]
    assert config.activation_checkpoint.selective_ac_option == "op"
    assert config.metrics.cpu_peak_tflops == 2.5
    assert config.debug.seed == 42
    assert config.validation.freq == 5
    assert config.model.converters == ["quantize.linear.float8"]


ALIASES = [
    (["--checkpoint.enable_checkpoint"], "checkpoint.enable", True),
    (["--checkpoint.no_enable_checkpoint"], "checkpoint.enable", False),
    (["--checkpoint.last_save_model_weights_only=false"], "checkpoint.last_save_model_only", False),
    (["--checkpoint.model_weights_only", "false"], "checkpoint.last_save_model_only", False),
    (["--checkpoint.initial_load_model_weights_only=false"], "checkpoint.initial_load_model_only", False),
    (["--lr_scheduler.lr_min", "0.2"], "lr_scheduler.min_lr_factor", 0.2),
    (["--job.print_args=false"], "job.print_config", False),
    (["--training.compile"], "compile.enable", True),
    (["--float8.emulate"], "quantize.linear.float8.emulate", True),
    (["--float8.recipe_name", "rowwise"], "quantize.linear.float8.recipe_name", "rowwise"),
    (["--model.tokenizer_path", "./assets/tok/tokenizer.model"], "model.hf_assets_path", "./assets/tok"),
    (["--model.tokenizer_path", "./assets/hf_folder"], "model.hf_assets_path", "./assets/hf_folder"),
    (["--training.batch_size", "4"], "training.local_batch_size", 4),
    (["--training.seed", "5"], "debug.seed", 5),
    (["--training.deterministic"], "debug.deterministic", True),
    (["--training.warmup_steps", "3"], "lr_scheduler.warmup_steps", 3),
    (["--training.tensor_parallel_degree", "2"], "parallelism.tensor_parallel_degree", 2),
    (["--training.data_parallel_shard_degree", "2"], "parallelism.data_parallel_shard_degree", 2),
    (["--experimental.pipeline_parallel_degree", "2"], "parallelism.pipeline_parallel_degree", 2),
    (["--experimental.context_parallel_degree", "2"], "parallelism.context_parallel_degree", 2),
]


@pytest.mark.usefixtures("schema_only")
@pytest.mark.parametrize("args, new_key, value", ALIASES, ids=[a[0][0] for a in ALIASES])
def test_deprecated_cli_alias(args, new_key, value, captured_warnings):
    config = ConfigManager().parse_args(args)
    target = config
    for part in new_key.split("."):
        target = getattr(target, part)
    assert target == value
    old_key = args[0][2:].split("=")[0].replace("no_", "")
    (message,) = messages(captured_warnings)
    assert message.startswith(f"config key '{old_key}' (command line) is deprecated; use '{new_key}'")


def test_tokenizer_path_to_existing_file_uses_its_folder(tmp_path, captured_warnings):
    tok = tmp_path / "llama" / "tokenizer.bin"
    tok.parent.mkdir()
    tok.write_bytes(b"")
    config = ConfigManager().parse_args(["--model.tokenizer_path", str(tok)])
    assert config.model.hf_assets_path == str(tok.parent)
    assert f"use 'model.hf_assets_path' = '{tok.parent}' instead" in messages(captured_warnings)[0]


def test_removed_keys_are_ignored_with_warning(captured_warnings):
    config = ConfigManager().parse_args(["--job.use_for_integration_test", "--model.norm_type", "rmsnorm"])
    assert config == JobConfig()
    assert messages(captured_warnings) == [
        "config key 'job.use_for_integration_test' (command line) was removed and is ignored: it had no effect on training",
        "config key 'model.norm_type' (command line) was removed and is ignored: models always use RMSNorm",
    ]


def test_v01_fixture_maps_every_old_name(captured_warnings):
    path = CONFIGS / "titan_v01_deprecated.toml"
    config = ConfigManager().parse_args(["--job.config_file", str(path)])
    assert config.job.print_config is False
    assert config.model.hf_assets_path == "./tests/assets/tokenizer"
    assert config.model.converters == ["quantize.linear.float8"]
    assert config.lr_scheduler.min_lr_factor == 0.1
    assert config.training.local_batch_size == 4
    assert config.compile.enable is True
    assert (config.debug.seed, config.debug.deterministic) == (7, True)
    assert config.checkpoint.enable is True
    assert config.checkpoint.last_save_model_only is False
    assert config.checkpoint.initial_load_model_only is False
    assert config.quantize.linear.float8.enable_fsdp_float8_all_gather is True
    assert config.quantize.linear.float8.emulate is True
    logged = messages(captured_warnings)
    where = f"(in {path})"
    for old, new in [
        ("job.print_args", "job.print_config"),
        ("model.tokenizer_path", "model.hf_assets_path"),
        ("lr_scheduler.lr_min", "lr_scheduler.min_lr_factor"),
        ("training.batch_size", "training.local_batch_size"),
        ("training.compile", "compile.enable"),
        ("training.seed", "debug.seed"),
        ("training.deterministic", "debug.deterministic"),
        ("training.tensor_parallel_degree", "parallelism.tensor_parallel_degree"),
        ("experimental.context_parallel_degree", "parallelism.context_parallel_degree"),
        ("checkpoint.enable_checkpoint", "checkpoint.enable"),
        ("checkpoint.last_save_model_weights_only", "checkpoint.last_save_model_only"),
        ("checkpoint.initial_load_model_weights_only", "checkpoint.initial_load_model_only"),
        ("float8.enable_fsdp_float8_all_gather", "quantize.linear.float8.enable_fsdp_float8_all_gather"),
        ("float8.emulate", "quantize.linear.float8.emulate"),
    ]:
        assert any(m.startswith(f"config key '{old}' {where} is deprecated; use '{new}'") for m in logged), old
    assert f"config key 'float8.force_recompute_fp8_weight_in_bwd' {where} was removed" in " ".join(logged)
    assert "model.converters entry 'float8' (config) is deprecated; use 'quantize.linear.float8' instead" in logged
    assert all("\n" not in m for m in logged)


_NOT_CONFIGS = {"outputs", "build", "dist", "wandb"}  # run outputs and build trees (git-ignored)


def _repo_tomls() -> list[Path]:
    def wanted(path: Path) -> bool:
        parts = path.relative_to(REPO).parts
        hidden = any(part.startswith(".") for part in parts)
        return path.name != "pyproject.toml" and not hidden and parts[0] not in _NOT_CONFIGS

    return sorted(p for p in REPO.rglob("*.toml") if wanted(p))


def test_repo_has_job_tomls():
    names = {p.name for p in _repo_tomls()}
    assert {"titan_v02_all_sections.toml", "titan_v01_deprecated.toml"} <= names


@pytest.mark.parametrize("path", _repo_tomls(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_repo_toml_parses(path, request):
    if path.parent == CONFIGS:
        request.getfixturevalue("schema_only")
    config = ConfigManager().parse_args(["--job.config_file", str(path)])
    assert config.job.config_file == str(path)
