"""ConfigManager extras: --help, print/save of the resolved config, custom config modules, custom imports."""

import itertools
import json
import textwrap

import pytest

from torchtitan.config import ConfigError, ConfigManager, JobConfig, to_dict
from torchtitan.config.job_config import Training
from torchtitan.config.manager import to_toml
from torchtitan.config.schema import leaves, type_name

CUSTOM_MODULE = '''
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CustomArgs:
    how_is_your_day: str = "good"
    """Just an example field, documented torchtitan-style."""
    num_experts: int = 4
    """Experts in the toy layer."""


@dataclass
class Training:
    steps: int = 99
    my_mix_ratio: float = 0.5
    """Mixing ratio of the custom dataset."""


@dataclass
class JobConfig:
    custom_args: CustomArgs = field(default_factory=CustomArgs)
    training: Training = field(default_factory=Training)
'''

_names = itertools.count()


@pytest.fixture
def make_module(tmp_path, monkeypatch):
    """Writes a uniquely named importable module and returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(source: str) -> str:
        name = f"titan_test_ext_{next(_names)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return make


def error_of(*args: str) -> str:
    with pytest.raises(ConfigError) as info:
        ConfigManager().parse_args(list(args))
    assert "\n" not in str(info.value)
    return str(info.value)


def run_help(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        ConfigManager().parse_args([*args, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_section_and_field(capsys):
    out = run_help(capsys)
    assert out.startswith("usage: python -m torchtitan.train")
    for key, leaf in leaves(JobConfig).items():
        assert f"  --{key} {type_name(leaf.type)}  (default: {leaf.default!r})\n      {leaf.help}" in out
    for section in ["[job]", "[training.dataloader]", "[quantize.linear.float8]", "[debug]", "[validation]"]:
        assert f"\n{section}" in out
    assert "  --optimizer.implementation {for-loop,foreach,fused}  (default: 'fused')" in out
    assert "  --parallelism.module_fqns_per_model_part list[list[str]] | None  (default: None)" in out
    assert "  --metrics.cpu_peak_tflops float | None  (default: None)\n      Peak TFLOPS of the CPU" in out


def test_short_help_flag(capsys):
    assert "[checkpoint]" in run_help(capsys, "-h")


def test_print_config_prints_resolved_json(capsys):
    config = ConfigManager().parse_args(["--job.print_config", "--training.steps", "12"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == to_dict(config)
    assert printed["training"]["steps"] == 12
    assert printed["training"]["dataloader"]["num_workers"] == 0


@pytest.mark.parametrize("name", ["config.json", "sub/config.toml"])
def test_save_config_file_round_trips(name, tmp_path):
    dump = tmp_path / "out"
    args = [
        "--job.dump_folder",
        str(dump),
        "--job.save_config_file",
        name,
        "--training.steps",
        "12",
        "--parallelism.module_fqns_per_model_part",
        "a,b;c",
        "--model.converters",
        "x,y",
        "--optimizer.lr",
        "3e-4",
    ]
    config = ConfigManager().parse_args(args)
    path = dump / name
    if name.endswith(".json"):
        assert json.loads(path.read_text()) == to_dict(config)
    else:
        reloaded = ConfigManager().parse_args(["--job.config_file", str(path)])
        reloaded.job.config_file = None
        assert reloaded == config


def test_save_config_file_only_on_rank0(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    ConfigManager().parse_args(["--job.dump_folder", str(tmp_path), "--job.save_config_file", "c.json"])
    assert list(tmp_path.iterdir()) == []


def test_to_dict_and_toml_of_defaults():
    data = to_dict(JobConfig())
    assert json.loads(json.dumps(data)) == data
    assert data["quantize"]["linear"]["float8"]["emulate"] is False
    text = to_toml(JobConfig())
    assert "[quantize.linear.float8]\n" in text and "[training.dataloader]\nnum_workers = 0\n" in text


def test_custom_config_module_from_cli(make_module):
    name = make_module(CUSTOM_MODULE)
    config = ConfigManager().parse_args(
        ["--job.custom_config_module", name, "--custom_args.num_experts", "8", "--training.my_mix_ratio=0.25"]
    )
    assert config.custom_args.num_experts == 8
    assert config.custom_args.how_is_your_day == "good"
    assert config.training.my_mix_ratio == 0.25
    assert config.training.steps == 99  # the custom default replaces the base one
    assert config.training.seq_len == 2048  # base fields of a merged section remain
    assert isinstance(config, JobConfig) and isinstance(config.training, Training)
    assert to_dict(config)["custom_args"] == {"how_is_your_day": "good", "num_experts": 8}


def test_custom_config_module_from_toml(make_module, tmp_path):
    name = make_module(CUSTOM_MODULE)
    toml = tmp_path / "job.toml"
    toml.write_text(f'[job]\ncustom_config_module = "{name}"\n[custom_args]\nhow_is_your_day = "great"\n')
    config = ConfigManager().parse_args(["--job.config_file", str(toml), "--custom_args.num_experts", "2"])
    assert (config.custom_args.how_is_your_day, config.custom_args.num_experts) == ("great", 2)
    assert config.job.custom_config_module == name


def test_custom_fields_are_typed_and_checked(make_module):
    name = make_module(CUSTOM_MODULE)
    assert error_of("--job.custom_config_module", name, "--custom_args.num_experts", "many") == (
        "bad value for custom_args.num_experts (command line): 'many'; fix: give an integer"
    )
    assert "did you mean custom_args.num_experts?" in error_of(
        "--job.custom_config_module", name, "--custom_args.num_expert", "3"
    )
    assert "unknown option --custom_args.num_experts" in error_of("--custom_args.num_experts", "3")


def test_custom_config_module_in_help(make_module, capsys):
    out = run_help(capsys, "--job.custom_config_module", make_module(CUSTOM_MODULE))
    assert "\n[custom_args]" in out
    assert "  --custom_args.num_experts int  (default: 4)\n      Experts in the toy layer." in out
    assert "  --training.my_mix_ratio float  (default: 0.5)\n      Mixing ratio of the custom dataset." in out
    assert "  --training.steps int  (default: 99)\n      Training steps" in out


def test_custom_config_module_errors(make_module):
    message = error_of("--job.custom_config_module", "no_such_titan_module")
    assert message.startswith(
        "job.custom_config_module = 'no_such_titan_module': cannot import it (ModuleNotFoundError"
    )
    assert "fix: give an importable module name" in message
    empty = make_module("X = 1\n")
    assert error_of("--job.custom_config_module", empty) == (
        f"job.custom_config_module = '{empty}' defines no JobConfig dataclass; fix: add `@dataclass class JobConfig`"
    )
    no_default = make_module("""
        from dataclasses import dataclass, field

        @dataclass
        class Extra:
            size: int

        @dataclass
        class JobConfig:
            extra: Extra = field(default_factory=lambda: Extra(1))
        """)
    assert "custom config field Extra.size has no default" in error_of("--job.custom_config_module", no_default)


def test_custom_import_runs_at_parse_time(make_module):
    import sys

    name = make_module("import sys\nsys.modules[__name__].REGISTERED = ['my_model']\n")
    config = ConfigManager().parse_args(["--experimental.custom_import", name])
    assert config.experimental.custom_import == name
    assert sys.modules[name].REGISTERED == ["my_model"]
    message = error_of("--experimental.custom_import", "no_such_titan_plugin")
    assert message.startswith("experimental.custom_import = 'no_such_titan_plugin': cannot import it")


def test_deprecated_custom_args_module_in_toml(make_module, tmp_path):
    name = make_module(CUSTOM_MODULE)
    toml = tmp_path / "job.toml"
    toml.write_text(f'[experimental]\ncustom_args_module = "{name}"\n[custom_args]\nnum_experts = 6\n')
    config = ConfigManager().parse_args(["--job.config_file", str(toml)])
    assert config.job.custom_config_module == name
    assert config.custom_args.num_experts == 6
