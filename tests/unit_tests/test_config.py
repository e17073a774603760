"""ConfigManager: schema defaults, precedence, CLI syntaxes, coercion, errors and validation."""

from pathlib import Path

import pytest

from torchtitan.config import ConfigError, ConfigManager, JobConfig
from torchtitan.config.schema import leaves


def parse(*args: str, toml: str | None = None, tmp_path: Path | None = None) -> JobConfig:
    argv = list(args)
    if toml is not None:
        path = tmp_path / "job.toml"
        path.write_text(toml)
        argv = ["--job.config_file", str(path), *argv]
    return ConfigManager().parse_args(argv)


def error_of(*args: str, toml: str | None = None, tmp_path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(*args, toml=toml, tmp_path=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    return message


# torchtitan 0.2 defaults from DESIGN.md section 4, spot-checked across every section.
DEFAULTS = {
    "job.dump_folder": "./outputs",
    "job.config_file": None,
    "job.custom_config_module": "",
    "profiling.save_traces_folder": "profile_traces",
    "profiling.profile_freq": 10,
    "profiling.profiler_active": 1,
    "profiling.profiler_warmup": 3,
    "profiling.save_memory_snapshot_folder": "memory_snapshot",
    "metrics.log_freq": 10,
    "metrics.save_tb_folder": "tb",
    "metrics.cpu_peak_tflops": None,
    "model.name": "llama3",
    "model.flavor": "debugmodel",
    "model.hf_assets_path": "./tests/assets/tokenizer",
    "model.converters": [],
    "optimizer.name": "AdamW",
    "optimizer.lr": 8e-4,
    "optimizer.beta1": 0.9,
    "optimizer.beta2": 0.95,
    "optimizer.eps": 1e-8,
    "optimizer.weight_decay": 0.1,
    "optimizer.implementation": "fused",
    "lr_scheduler.warmup_steps": 200,
    "lr_scheduler.total_steps": None,
    "lr_scheduler.decay_ratio": None,
    "lr_scheduler.decay_type": "linear",
    "lr_scheduler.min_lr_factor": 0.0,
    "training.dataset": "c4_test",
    "training.dataset_path": None,
    "training.local_batch_size": 8,
    "training.global_batch_size": -1,
    "training.seq_len": 2048,
    "training.max_norm": 1.0,
    "training.steps": 10000,
    "training.dtype": "float32",
    "training.mixed_precision_param": "bfloat16",
    "training.mixed_precision_reduce": "float32",
    "training.gc_freq": 50,
    "training.dataloader.num_workers": 0,
    "training.dataloader.persistent_workers": False,
    "training.dataloader.pin_memory": False,
    "training.dataloader.prefetch_factor": None,
    "parallelism.data_parallel_replicate_degree": 1,
    "parallelism.data_parallel_shard_degree": -1,
    "parallelism.fsdp_reshard_after_forward": "default",
    "parallelism.tensor_parallel_degree": 1,
    "parallelism.pipeline_parallel_degree": 1,
    "parallelism.module_fqns_per_model_part": None,
    "parallelism.pipeline_parallel_first_stage_less_layers": 1,
    "parallelism.pipeline_parallel_last_stage_less_layers": 1,
    "parallelism.pipeline_parallel_layers_per_stage": None,
    "parallelism.pipeline_parallel_schedule": "1F1B",
    "parallelism.pipeline_parallel_microbatch_size": 1,
    "parallelism.context_parallel_degree": 1,
    "parallelism.context_parallel_load_balancer": "headtail",
    "parallelism.context_parallel_rotate_method": "allgather",
    "parallelism.context_parallel_attention": "auto",
    "parallelism.expert_parallel_degree": 1,
    "parallelism.expert_tensor_parallel_degree": 1,
    "checkpoint.enable": False,
    "checkpoint.folder": "checkpoint",
    "checkpoint.interval": 500,
    "checkpoint.initial_load_path": None,
    "checkpoint.initial_load_model_only": True,
    "checkpoint.last_save_model_only": True,
    "checkpoint.export_dtype": "float32",
    "checkpoint.async_mode": "disabled",
    "checkpoint.keep_latest_k": 10,
    "checkpoint.load_step": -1,
    "checkpoint.exclude_from_loading": [],
    "activation_checkpoint.mode": "selective",
    "activation_checkpoint.selective_ac_option": "2",
    "activation_checkpoint.preserve_rng_state": True,
    "compile.enable": False,
    "compile.components": ["model", "loss"],
    "compile.backend": "inductor",
    "quantize.linear.float8.enable_fsdp_float8_all_gather": False,
    "quantize.linear.float8.recipe_name": None,
    "quantize.linear.float8.filter_fqns": [],
    "quantize.linear.float8.emulate": False,
    "comm.init_timeout_seconds": 300,
    "comm.train_timeout_seconds": 100,
    "comm.trace_buf_size": 20000,
    "comm.save_traces_folder": "comm_traces",
    "comm.mode": "default",
    "memory_estimation.enable": False,
    "fault_tolerance.enable": False,
    "experimental.custom_import": "",
    "validation.enable": False,
    "validation.freq": 10,
    "validation.steps": -1,
    "debug.seed": None,
    "debug.deterministic": False,
    "debug.deterministic_warn_only": False,
}


def get(config: JobConfig, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


def test_defaults_match_torchtitan_02():
    config = parse()
    assert {key: get(config, key) for key in DEFAULTS} == DEFAULTS
    assert config == JobConfig()


def test_every_field_has_a_help_line():
    missing = [key for key, leaf in leaves(JobConfig).items() if not leaf.help]
    assert missing == []


def test_list_defaults_are_not_shared():
    a, b = JobConfig(), JobConfig()
    a.compile.components.append("x")
    assert b.compile.components == ["model", "loss"]


def test_precedence_defaults_toml_cli(tmp_path):
    toml = "[training]\nsteps = 20\nseq_len = 128\n[optimizer]\nlr = 0.01\n"
    config = parse("--training.steps", "30", toml=toml, tmp_path=tmp_path)
    assert config.training.steps == 30  # CLI beats TOML
    assert config.training.seq_len == 128  # TOML beats default
    assert config.optimizer.lr == 0.01
    assert config.training.local_batch_size == 8  # default
    assert config.job.config_file == str(tmp_path / "job.toml")


@pytest.mark.parametrize(
    "args",
    [
        ["--training.steps", "7"],
        ["--training.steps=7"],
        ["--training.steps", "3", "--training.steps", "7"],
        ["--job.config-file", "{toml}", "--training.steps", "7"],
    ],
)
def test_cli_value_syntaxes(args, tmp_path):
    toml = tmp_path / "j.toml"
    toml.write_text("[training]\nsteps = 3\n")
    config = ConfigManager().parse_args([a.format(toml=toml) for a in args])
    assert config.training.steps == 7


def test_cli_dashes_and_nested_sections():
    config = parse(
        "--training.dataloader.num-workers",
        "2",
        "--training.dataloader.prefetch_factor=3",
        "--quantize.linear.float8.emulate",
        "--quantize.linear.float8.recipe-name",
        "rowwise",
        "--lr-scheduler.decay-type=cosine",
    )
    assert config.training.dataloader.num_workers == 2
    assert config.training.dataloader.prefetch_factor == 3
    assert config.quantize.linear.float8.emulate is True
    assert config.quantize.linear.float8.recipe_name == "rowwise"
    assert config.lr_scheduler.decay_type == "cosine"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--checkpoint.enable"], True),
        (["--checkpoint.enable", "--training.steps", "5"], True),
        (["--checkpoint.enable=true"], True),
        (["--checkpoint.enable=False"], False),
        (["--checkpoint.enable", "false"], False),
        (["--checkpoint.enable", "1"], True),
        (["--checkpoint.enable", "--checkpoint.no_enable"], False),
        (["--checkpoint.no-enable"], False),
    ],
)
def test_booleans_both_ways(args, expected):
    assert parse(*args).checkpoint.enable is expected


def test_negating_a_true_default():
    assert parse("--checkpoint.no_last_save_model_only").checkpoint.last_save_model_only is False


def test_lists_comma_separated_and_toml_arrays(tmp_path):
    config = parse("--model.converters", "a,b", "--checkpoint.exclude_from_loading=optimizer, lr_scheduler")
    assert config.model.converters == ["a", "b"]
    assert config.checkpoint.exclude_from_loading == ["optimizer", "lr_scheduler"]
    assert parse("--compile.components", "").compile.components == []
    assert parse("--compile.components", "loss").compile.components == ["loss"]
    assert parse("--model.converters", '["x", "y"]').model.converters == ["x", "y"]
    toml = '[checkpoint]\nexclude_from_loading = ["dataloader"]\n'
    assert parse(toml=toml, tmp_path=tmp_path).checkpoint.exclude_from_loading == ["dataloader"]


def test_list_of_lists(tmp_path):
    toml = '[parallelism]\nmodule_fqns_per_model_part = [["tok_embeddings", "layers.0"], ["layers.1", "output"]]\n'
    config = parse(toml=toml, tmp_path=tmp_path)
    assert config.parallelism.module_fqns_per_model_part == [["tok_embeddings", "layers.0"], ["layers.1", "output"]]
    config = parse("--parallelism.module_fqns_per_model_part", "a,b;c")
    assert config.parallelism.module_fqns_per_model_part == [["a", "b"], ["c"]]
    config = parse("--parallelism.module_fqns_per_model_part", '[["a"], ["b", "c"]]')
    assert config.parallelism.module_fqns_per_model_part == [["a"], ["b", "c"]]
    assert parse("--parallelism.module_fqns_per_model_part", "None").parallelism.module_fqns_per_model_part is None


def test_optional_and_numeric_coercion(tmp_path):
    config = parse("--lr_scheduler.decay_ratio", "0.5", "--debug.seed", "3", "--optimizer.lr", "1e-3")
    assert (config.lr_scheduler.decay_ratio, config.debug.seed, config.optimizer.lr) == (0.5, 3, 1e-3)
    config = parse("--lr_scheduler.decay_ratio", "0.5", "--lr_scheduler.decay_ratio", "None")
    assert config.lr_scheduler.decay_ratio is None
    config = parse(toml="[optimizer]\nlr = 1\n", tmp_path=tmp_path)
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert parse("--training.global_batch_size", "-1").training.global_batch_size == -1


@pytest.mark.parametrize(
    "args, toml, expected",
    [
        (["--training.steps", "ten"], None, "bad value for training.steps (command line): 'ten'; fix: give an integer"),
        (["--optimizer.lr", "fast"], None, "bad value for optimizer.lr (command line): 'fast'; fix: give a number"),
        (
            ["--checkpoint.enable=maybe"],
            None,
            "bad value for checkpoint.enable (command line): 'maybe'; fix: give a boolean",
        ),
        (
            ["--optimizer.implementation", "fast"],
            None,
            "bad value for optimizer.implementation (command line): 'fast'; fix: give one of 'for-loop', 'foreach', 'fused'",
        ),
        (["--compile.components", "model,optimizer"], None, "give one of 'model', 'loss'"),
        (["--debug.seed", "x"], None, "bad value for debug.seed (command line): 'x'; fix: give an integer or None"),
        ([], '[training]\nsteps = "10"\n', "bad value for training.steps (in {path}): '10'; fix: give an integer"),
        ([], "[training]\nsteps = 1.5\n", "bad value for training.steps (in {path}): 1.5; fix: give an integer"),
        ([], "[checkpoint]\nenable = 1\n", "bad value for checkpoint.enable (in {path}): 1; fix: give a boolean"),
        ([], "[activation_checkpoint]\nselective_ac_option = 2\n", "fix: give a string (quote it in TOML)"),
        ([], '[activation_checkpoint]\nmode = "partial"\n', "give one of 'selective', 'full', 'none'"),
        ([], "[checkpoint]\nexclude_from_loading = 3\n", "bad value for checkpoint.exclude_from_loading"),
        ([], "[parallelism]\nmodule_fqns_per_model_part = [1]\n", "module_fqns_per_model_part"),
    ],
)
def test_wrong_type_and_bad_choice(args, toml, expected, tmp_path):
    message = error_of(*args, toml=toml, tmp_path=tmp_path)
    assert expected.format(path=tmp_path / "job.toml") in message


def test_unknown_cli_key_suggests():
    message = error_of("--parallelism.tensor_paralel_degree", "2")
    assert message == (
        "unknown option --parallelism.tensor_paralel_degree (command line); "
        "did you mean parallelism.tensor_parallel_degree?"
    )
    assert "did you mean training.steps?" in error_of("--traning.steps", "2")
    assert "did you mean debug.seed?" in error_of("--checkpoint.seed", "2")
    assert "run with --help" in error_of("--zzz.qqq", "1")


def test_unknown_toml_key_and_section_suggest(tmp_path):
    path = tmp_path / "job.toml"
    message = error_of(toml="[training]\nstpes = 10\n", tmp_path=tmp_path)
    assert message == f"unknown config key training.stpes (in {path}); did you mean training.steps?"
    message = error_of(toml="[traning]\nsteps = 10\n", tmp_path=tmp_path)
    assert message == f"unknown config section [traning] (in {path}); did you mean [training]?"
    message = error_of(toml="[quantize.linear.float9]\nemulate = true\n", tmp_path=tmp_path)
    assert "did you mean [quantize.linear.float8]?" in message
    message = error_of(toml="[training.steps]\nx = 1\n", tmp_path=tmp_path)
    assert "[training.steps]" in message and "is a value, not a section" in message


def test_missing_and_malformed_toml(tmp_path):
    missing = tmp_path / "nope.toml"
    message = error_of("--job.config_file", str(missing))
    assert (
        message == f"config file not found: {missing} (--job.config_file); fix: pass the path of an existing TOML file"
    )
    message = error_of(toml="[training\nsteps = 3\n", tmp_path=tmp_path)
    assert message.startswith(f"cannot parse TOML config file {tmp_path / 'job.toml'}: ")
    assert "line 1" in message


def test_toml_with_utf8_byte_order_mark(tmp_path):
    """Windows editors start UTF-8 files with a BOM; the file still loads."""
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeff[training]\nsteps = 7\n".encode("utf-8"))
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert parse("--job.config_file", str(path)).training.steps == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parallelism.expert_parallel_degree", "4"], "parallelism.expert_parallel_degree=4"),
        (["--parallelism.expert_tensor_parallel_degree", "2"], "parallelism.expert_tensor_parallel_degree=2"),
        (["--parallelism.enable_compiled_autograd"], "parallelism.enable_compiled_autograd=true"),
        (["--optimizer.early_step_in_backward"], "optimizer.early_step_in_backward=true"),
        (["--fault_tolerance.enable"], "fault_tolerance.enable=true"),
        (["--model.converters", "quantize.grouped_mm.float8"], "model.converters=['quantize.grouped_mm.float8']"),
        (["--model.converters", "quantize.grouped_mm.mx"], "model.converters=['quantize.grouped_mm.mx']"),
    ],
)
def test_switches_of_unbuilt_features_are_refused(args, message):
    """Whatever switches on a feature that is not built is refused in one line, from one table."""
    assert error_of(*args).startswith(f"{message} is not supported yet; fix: ")


def test_settings_of_features_that_are_off_stay_accepted(tmp_path):
    """torchtitan's own TOML files parametrize features they leave off: that parses, and changes nothing."""
    config = parse(
        "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
        "--parallelism.context_parallel_load_balancer", "headtail",
        toml=(
            "[parallelism]\npipeline_parallel_degree = 1\npipeline_parallel_microbatch_size = 2\n"
            "[quantize.linear.float8]\nenable_fsdp_float8_all_gather = true\nfilter_fqns = ['output']\n"
            "[validation]\nenable = false\nfreq = 5\n[memory_estimation]\ndisable_fake_mode = true\n"
        ),
        tmp_path=tmp_path,
    )
    assert config.parallelism.pipeline_parallel_schedule == "Interleaved1F1B"
    assert config.quantize.linear.float8.enable_fsdp_float8_all_gather
    assert config.model.converters == [] and not config.validation.enable


def test_cli_shape_errors():
    assert error_of("training.steps", "3").startswith("unexpected command-line argument 'training.steps'")
    assert error_of("--training.steps") == (
        "--training.steps needs a value (int); fix: write --training.steps VALUE or --training.steps=VALUE"
    )
    assert "takes no value" in error_of("--checkpoint.no_enable=true")
    assert "unknown option --training.no_steps" in error_of("--training.no_steps")


@pytest.mark.parametrize(
    "args, key",
    [
        (["--training.global_batch_size", "12"], "training.global_batch_size = 12 is invalid"),
        (["--training.global_batch_size", "0"], "training.global_batch_size = 0 is invalid"),
        (["--training.local_batch_size", "0"], "training.local_batch_size = 0 is invalid; fix: use a value >= 1"),
        (["--training.steps", "0"], "training.steps = 0 is invalid"),
        (["--training.seq_len", "-5"], "training.seq_len = -5 is invalid"),
        (["--checkpoint.keep_latest_k", "1"], "checkpoint.keep_latest_k = 1 is invalid; fix: use 0 (keep all) or"),
        (["--checkpoint.keep_latest_k", "-1"], "checkpoint.keep_latest_k = -1 is invalid"),
        (
            ["--lr_scheduler.decay_ratio", "1.5"],
            "lr_scheduler.decay_ratio = 1.5 is invalid; fix: use None or a value in [0, 1]",
        ),
        (["--lr_scheduler.min_lr_factor", "-0.1"], "lr_scheduler.min_lr_factor = -0.1 is invalid"),
        (["--lr_scheduler.warmup_steps", "-1"], "lr_scheduler.warmup_steps = -1 is invalid"),
        (["--parallelism.data_parallel_shard_degree", "0"], "fix: use -1 (use the remaining ranks) or a value >= 1"),
        (["--parallelism.tensor_parallel_degree", "0"], "parallelism.tensor_parallel_degree = 0 is invalid"),
        (["--parallelism.pipeline_parallel_degree", "-1"], "parallelism.pipeline_parallel_degree = -1 is invalid"),
        (["--parallelism.context_parallel_degree", "0"], "parallelism.context_parallel_degree = 0 is invalid"),
        (["--parallelism.context_parallel_load_balancer", "ptrr"], "fix: use headtail or none"),
        (["--parallelism.context_parallel_attention", "ring"], "parallelism.context_parallel_attention"),
        (["--optimizer.beta2", "1.0"], "optimizer.beta2 = 1.0 is invalid; fix: use a value in [0, 1)"),
        (["--optimizer.eps", "0"], "optimizer.eps = 0.0 is invalid"),
        (["--activation_checkpoint.selective_ac_option", "every"], "fix: use 'op' or a positive integer"),
        (["--activation_checkpoint.selective_ac_option", "0"], "selective_ac_option = '0' is invalid"),
        (["--training.dataloader.persistent_workers"], "training.dataloader.persistent_workers = True is invalid"),
        (["--training.dataloader.prefetch_factor", "2"], "set training.dataloader.num_workers > 0"),
        (["--metrics.log_freq", "0"], "metrics.log_freq = 0 is invalid"),
        (["--metrics.cpu_peak_tflops", "0"], "metrics.cpu_peak_tflops = 0.0 is invalid"),
        (["--validation.steps", "0"], "validation.steps = 0 is invalid"),
        (
            ["--validation.enable", "--parallelism.pipeline_parallel_degree", "2", "--validation.seq_len", "128",
             "--training.seq_len", "64"],
            "validation.seq_len = 128 is invalid; fix: use training.seq_len (64) under pipeline parallelism",
        ),
        (["--checkpoint.load_step", "-2"], "checkpoint.load_step = -2 is invalid"),
    ],
)
def test_cross_field_validation_errors(args, key):
    assert key in error_of(*args)


def test_valid_edge_values():
    config = parse(
        "--training.local_batch_size",
        "4",
        "--training.global_batch_size",
        "16",
        "--checkpoint.keep_latest_k",
        "0",
        "--lr_scheduler.decay_ratio",
        "1",
        "--parallelism.data_parallel_shard_degree",
        "2",
        "--activation_checkpoint.selective_ac_option",
        "op",
        "--training.dataloader.num_workers",
        "2",
        "--training.dataloader.persistent_workers",
        "--training.dataloader.prefetch_factor",
        "4",
    )
    assert config.training.global_batch_size == 16
    assert config.checkpoint.keep_latest_k == 0
    assert config.lr_scheduler.decay_ratio == 1.0


def test_warmup_longer_than_run_is_clamped_with_warning(captured_warnings):
    config = parse("--training.steps", "50", "--lr_scheduler.warmup_steps", "80")
    assert config.lr_scheduler.warmup_steps == 50
    assert [r.getMessage() for r in captured_warnings.records] == [
        "lr_scheduler.warmup_steps (80) exceeds the total training steps (50); adjusting warmup steps to 50"
    ]
    config = parse("--training.steps", "50", "--lr_scheduler.total_steps", "500", "--lr_scheduler.warmup_steps", "80")
    assert config.lr_scheduler.warmup_steps == 80
