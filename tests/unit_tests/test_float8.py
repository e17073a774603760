"""The float8 converter and the MX gate in one process: which Linears are converted and why the others
are not, the recipes, every config and hardware error (capabilities passed in through monkeypatch),
the missing-torchao message, the post-optimizer hook and the TP styles."""

import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel

pytest.importorskip("torchao")  # the optional extra .[float8] (part of .[dev])

from torchao.float8.config import ScalingGranularity, ScalingType
from torchao.float8.float8_linear import Float8Linear
from torchao.float8.float8_tensor_parallel import (
    Float8ColwiseParallel,
    Float8RowwiseParallel,
    PrepareFloat8ModuleInput,
)
from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

from tests.integration_tests.runner import DEBUG_CONFIG
from tests.unit_tests.test_parallel_dims import dims
from torchtitan import train
from torchtitan.components.checkpoint_storage import Comm, prepare_write, write_dcp
from torchtitan.components.quantization import float8, mx
from torchtitan.config import ConfigError, ConfigManager, JobConfig
from torchtitan.distributed.tensor_parallel import PLAIN_TP_STYLES
from torchtitan.models.llama3.infra.parallelize import llama_tp_plan
from torchtitan.protocols.model_converter import build_model_converters
from torchtitan.protocols.train_spec import build_meta_model, get_train_spec

FLOAT8 = "quantize.linear.float8"


def job(converter: str = FLOAT8, **float8_fields: object) -> JobConfig:
    jc = JobConfig()
    jc.model.converters = [converter]
    for key, value in float8_fields.items():
        setattr(jc.quantize.linear.float8, key, value)
    return jc


def build(jc: JobConfig, world_size: int = 1) -> float8.Float8LinearConverter:
    (converter,) = build_model_converters(jc, dims(world_size)).converters
    return converter


def model() -> nn.Module:
    """On meta: one Linear for each decision (K, N = in, out features)."""
    with torch.device("meta"):
        return nn.ModuleDict({
            "big": nn.Linear(8192, 1024),  # K > 4096: torchao's tensorwise size filter converts it
            "small": nn.Linear(64, 64),  # K <= 4096 and N <= 1024: too small to pay off
            "odd": nn.Linear(64, 40),  # 40 is not a multiple of 16
            "output": nn.Linear(64, 64),
        })


@pytest.mark.parametrize(
    "filter_fqns, converted, message",
    [
        (["output"], {"big", "small"}, "converted 2 of 4 Linear layers; skipped 2: odd (weight dims not "
                                       "divisible by 16), output (filter_fqns)"),
        (["output", "auto_filter_small_kn"], {"big"}, "converted 1 of 4 Linear layers; skipped 3: small "
         "(auto_filter_small_kn), odd (weight dims not divisible by 16), output (filter_fqns)"),
    ],
)
def test_converts_eligible_linears_and_logs_the_rest(captured_logs, filter_fqns, converted, message):
    m = model()
    build(job(filter_fqns=filter_fqns)).convert(m)
    assert {name for name, mod in m.items() if isinstance(mod, Float8Linear)} == converted
    assert all(type(mod) is nn.Linear for name, mod in m.items() if name not in converted)
    assert captured_logs.messages[-1] == f"Float8 training (tensorwise, emulated): {message}"  # CPU: emulated


def test_nothing_converted_is_a_warning(captured_logs):
    m = model()
    build(job(filter_fqns=["big", "small", "output"], recipe_name="rowwise", emulate=True)).convert(m)
    record = captured_logs.records[-1]
    assert record.levelname == "WARNING"
    assert record.getMessage().startswith("Float8 training (rowwise, emulated): converted 0 of 4 Linear layers")


@pytest.mark.parametrize("recipe", [None, "tensorwise", "rowwise", "rowwise_with_gw_hp"])
@pytest.mark.parametrize(
    "capability, emulate, emulated",
    [((9, 0), False, False), ((9, 0), True, True), ((8, 0), True, True), (None, False, True), (None, True, True)],
)
def test_recipes(monkeypatch, recipe, capability, emulate, emulated):
    """On an SM 8.9+ GPU `emulate` is the user's choice; without CUDA the matmuls are always emulated."""
    monkeypatch.setattr(float8, "cuda_capability", lambda: capability)
    converter = build(job(recipe_name=recipe, emulate=emulate))
    config = converter.config
    assert converter.recipe == (recipe or "tensorwise") and config.emulate is emulated
    expected = ScalingGranularity.TENSORWISE if recipe in (None, "tensorwise") else ScalingGranularity.AXISWISE
    assert config.cast_config_weight.scaling_granularity is expected
    grad_weight_in_float8 = config.cast_config_input_for_grad_weight.scaling_type is not ScalingType.DISABLED
    assert grad_weight_in_float8 is (recipe != "rowwise_with_gw_hp")
    m = model()
    converter.convert(m)
    assert m["big"].config == config


def test_fsdp_float8_all_gather_wraps_weights_and_precomputes_after_each_step(monkeypatch, captured_logs):
    converter = build(
        job(enable_fsdp_float8_all_gather=True, precompute_float8_dynamic_scale_for_fsdp=True), world_size=2
    )
    m = model()
    converter.convert(m)
    assert isinstance(m["big"].weight.data, WeightWithDynamicFloat8CastTensor)
    assert "float8 FSDP all-gather): converted" in captured_logs.messages[-1]
    calls = []
    monkeypatch.setattr("torchao.float8.precompute_float8_dynamic_scale_for_fsdp", calls.append)
    converter.post_optimizer_hook([m, m["big"]])
    assert calls == [m, m["big"]]
    build(job()).post_optimizer_hook(m)  # without precomputed scales the hook does nothing
    assert len(calls) == 2


@pytest.mark.parametrize(
    "fields, world_size, message",
    [
        ({"enable_fsdp_float8_all_gather": True}, 1,
         "quantize.linear.float8.enable_fsdp_float8_all_gather=true needs FSDP sharding "
         "(data_parallel_shard_degree > 1); fix: drop the flag or shard"),
        ({"enable_fsdp_float8_all_gather": True, "recipe_name": "rowwise"}, 2,
         "quantize.linear.float8.enable_fsdp_float8_all_gather=true needs recipe_name tensorwise (got rowwise); "
         "fix: drop the flag or use the tensorwise recipe"),
        ({"precompute_float8_dynamic_scale_for_fsdp": True}, 2,
         "quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp=true only applies to the float8 "
         "all-gather; fix: also set quantize.linear.float8.enable_fsdp_float8_all_gather, or drop the flag"),
        ({"filter_fqns": ["auto_filter_small_kn"], "recipe_name": "rowwise_with_gw_hp"}, 1,
         "quantize.linear.float8.filter_fqns: auto_filter_small_kn has no size thresholds for recipe "
         "rowwise_with_gw_hp; fix: use the tensorwise or rowwise recipe, or list the FQNs to skip instead"),
    ],
)
def test_config_errors(fields, world_size, message):
    with pytest.raises(ConfigError) as error:
        build(job(**fields), world_size)
    assert str(error.value) == message


@pytest.mark.parametrize(
    "converter, capability, emulate, message",
    [
        (FLOAT8, (8, 0), False, "model.converters: quantize.linear.float8 needs a CUDA GPU of compute capability "
         ">= 8.9 (SM 8.9); this GPU is SM 8.0; fix: set quantize.linear.float8.emulate = true, or run on an "
         "SM 8.9+ GPU (Ada, Hopper, Blackwell)"),
        (FLOAT8, (8, 0), True, None),
        (FLOAT8, (8, 9), False, None),
        (FLOAT8, (9, 0), False, None),
        (FLOAT8, None, False, None),  # CPU: emulated
        ("quantize.linear.mx", None, False, "model.converters: quantize.linear.mx needs a CUDA GPU of compute "
         "capability >= 10.0 (SM 10.0); this machine has no CUDA GPU; fix: remove quantize.linear.mx from "
         "model.converters (quantize.linear.float8 runs on SM 8.9+ GPUs and on CPU)"),
        ("quantize.linear.mx", (9, 0), False, "model.converters: quantize.linear.mx needs a CUDA GPU of compute "
         "capability >= 10.0 (SM 10.0); this GPU is SM 9.0; fix: remove quantize.linear.mx"),
        ("quantize.linear.mx", (10, 0), False, "model.converters: quantize.linear.mx is not supported yet (this "
         "GPU meets its SM 10.0 requirement, but the MXFP8 conversion is not built); fix: use "
         "quantize.linear.float8"),
    ],
)
def test_hardware_gates(monkeypatch, converter, capability, emulate, message):
    for module in (float8, mx):
        monkeypatch.setattr(module, "cuda_capability", lambda: capability)
    jc = job(converter, emulate=emulate)
    if message is None:
        assert isinstance(build(jc), float8.Float8LinearConverter)
        return
    with pytest.raises(ConfigError) as error:
        build(jc)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("converter", [FLOAT8, "quantize.linear.mx"])
def test_missing_torchao_names_the_install_command(monkeypatch, converter):
    monkeypatch.setitem(sys.modules, "torchao", None)  # makes `import torchao` raise ImportError
    with pytest.raises(ConfigError) as error:
        build(job(converter))
    assert str(error.value) == (
        f'model.converters: {converter} needs torchao, which is not installed; fix: pip install -e ".[float8]"'
    )


@pytest.mark.parametrize(
    "converters, recipe, device, float8_styles",
    [
        ([], None, "cuda", False),
        ([FLOAT8], None, "cpu", False),  # gloo has no float8 collectives
        ([FLOAT8], "rowwise", "cuda", False),  # torchao's float8 TP styles assume tensorwise scales
        ([FLOAT8], "tensorwise", "cuda", True),
    ],
)
def test_tp_styles(captured_logs, converters, recipe, device, float8_styles):
    jc = job(recipe_name=recipe)
    jc.model.converters = converters
    styles = float8.linear_tp_styles(jc, device)
    if not float8_styles:
        assert styles == PLAIN_TP_STYLES
        assert ("gloo lacks" in captured_logs.text) is (device == "cpu")
        return
    plan = llama_tp_plan(styles=styles)
    assert isinstance(plan["layers.*.attention.wq"], Float8ColwiseParallel)
    assert isinstance(plan["layers.*.feed_forward.w2"], Float8RowwiseParallel)
    assert isinstance(plan["layers.*.attention"], PrepareFloat8ModuleInput)
    assert type(plan["output"]) is ColwiseParallel  # the output layer stays in high precision


def test_debug_model_toml_converts_every_block_linear_but_not_output():
    """The shipped debug TOML's [quantize.linear.float8] section (filter_fqns = ["output"]) on the real model."""
    jc = ConfigManager().parse_args(["--job.config_file", str(DEBUG_CONFIG), "--model.converters", FLOAT8])
    spec = get_train_spec("llama3")
    _, m = build_meta_model(spec, jc, spec.build_tokenizer_fn(jc))
    build_model_converters(jc, dims(1)).convert(m)
    linears = {name: type(mod) for name, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    assert linears.pop("output") is nn.Linear
    assert len(linears) == 6 * 7 and set(linears.values()) == {Float8Linear}


def test_checkpoint_stores_float8_all_gather_weights_as_plain_tensors(tmp_path):
    """A DCP checkpoint of FSDP float8 all-gather weights (torchao's wrapper subclass) loads where the
    subclass is not allowlisted for `weights_only` unpickling: in a run without torchao (e.g. fp32)."""
    from torchao.float8.float8_training_tensor import LinearMMConfig

    values = torch.randn(32, 16)
    wrapped = WeightWithDynamicFloat8CastTensor(values.clone(), LinearMMConfig(), torch.float8_e4m3fn)
    final = str(tmp_path / "step-1")
    write_dcp({"w": wrapped}, prepare_write(final, Comm(None)), final, Comm(None))
    allowlisted = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()  # as in a process that never imported torchao
    try:
        loaded = {"w": torch.empty(32, 16)}
        dcp.load(loaded, checkpoint_id=final, no_dist=True)
    finally:
        torch.serialization.add_safe_globals(allowlisted)
    assert type(loaded["w"]) is torch.Tensor and torch.equal(loaded["w"], values)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--quantize.linear.float8.enable_fsdp_float8_all_gather"],
         "error: quantize.linear.float8.enable_fsdp_float8_all_gather=true needs FSDP sharding"),
        (["--model.converters", "quantize.linear.mx"],
         "error: model.converters: quantize.linear.mx needs a CUDA GPU of compute capability >= 10.0 (SM 10.0); "
         "this machine has no CUDA GPU"),
    ],
)
def test_trainer_stops_in_one_line(tmp_path, capfd, monkeypatch, overrides, expected):
    """`python -m torchtitan.train` with the debug TOML: exit code 2, one error line, no traceback."""
    monkeypatch.setattr(train, "init_logger", lambda: None)  # keep pytest's log capture
    # ...and drop handlers an earlier in-process main() left on streams pytest has closed since.
    monkeypatch.setattr(train.logger, "handlers", [])
    argv = ["--job.config_file", str(DEBUG_CONFIG), "--job.dump_folder", str(tmp_path), "--model.converters", FLOAT8]
    code = train.main([*argv, *overrides])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(expected), err[-2000:]
    assert "Traceback" not in err
