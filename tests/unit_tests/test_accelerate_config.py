"""The Python API's configuration (JobConfig.from_dict/from_toml, TorchTitanPlugin: Accelerate-page keys,
TORCHTITAN_* environment, precedence) and the one-line errors of the Accelerator that need no process group."""

import logging
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from torchtitan import JobConfig, Trainer
from torchtitan.accelerate import Accelerator, TorchTitanPlugin
from torchtitan.accelerate.config import resolve_job_config
from torchtitan.config import ConfigError, ConfigManager
from torchtitan.protocols.train_spec import get_train_spec

PAGE_CONFIG = {
    "training": {"batch_size": 4, "seq_len": 256, "gradient_accumulation_steps": 8, "max_steps": 100,
                 "learning_rate": 3e-4, "warmup_steps": 20},
    "model": {"name": "llama3", "vocab_size": 32000, "embed_dim": 128, "num_layers": 3, "num_heads": 4,
              "num_kv_heads": 2, "intermediate_size": 352, "max_seq_len": 512, "rope_theta": 10000.0},
    "parallelism": {"tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 2, "sequence_parallel": False},
    "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "beta1": 0.8, "beta2": 0.9, "eps": 1e-6},
    "checkpointing": {"save_interval": 50, "save_dir": "./ckpts", "resume_from_checkpoint": None},
    "memory": {"gradient_checkpointing": True, "activation_checkpointing": False, "cpu_offload": True},
}
PAGE_TOML = """
[training]
batch_size = 4
seq_len = 256
gradient_accumulation_steps = 8
max_steps = 100
learning_rate = 3e-4
warmup_steps = 20

[model]
name = "llama3"
vocab_size = 32000
embed_dim = 128
num_layers = 3
num_heads = 4
num_kv_heads = 2
intermediate_size = 352
max_seq_len = 512
rope_theta = 10000.0

[parallelism]
tensor_parallel = 1
pipeline_parallel = 1
data_parallel = 2
sequence_parallel = false

[optimizer]
name = "adamw"
lr = 1e-3
weight_decay = 0.05
beta1 = 0.8
beta2 = 0.9
eps = 1e-6

[checkpointing]
save_interval = 50
save_dir = "./ckpts"
resume_from_checkpoint = ""

[memory]
gradient_checkpointing = true
activation_checkpointing = false
cpu_offload = true
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("WORLD_SIZE", "ACCELERATE_USE_TORCHTITAN", "TORCHTITAN_CONFIG_PATH", "TORCHTITAN_MODEL_NAME",
                "TORCHTITAN_CHECKPOINT_DIR", "TORCHTITAN_TP_SIZE", "TORCHTITAN_PP_SIZE", "TORCHTITAN_DP_SIZE",
                "TORCHTITAN_GRADIENT_CHECKPOINTING", "TORCHTITAN_ACTIVATION_CHECKPOINTING"):
        monkeypatch.delenv(var, raising=False)


def assert_page_config(jc: JobConfig) -> None:
    t = jc.training
    assert (t.local_batch_size, t.seq_len, t.steps) == (4, 256, 100)
    assert t.global_batch_size == 4 * 8 * 2  # local x accumulation x data-parallel degree
    assert jc.optimizer.lr == 1e-3  # [optimizer] lr is ours and comes after training.learning_rate
    assert (jc.optimizer.name, jc.optimizer.weight_decay, jc.optimizer.beta1, jc.optimizer.beta2,
            jc.optimizer.eps) == ("AdamW", 0.05, 0.8, 0.9, 1e-6)
    assert jc.lr_scheduler.warmup_steps == 20
    p = jc.parallelism
    assert (p.tensor_parallel_degree, p.pipeline_parallel_degree, p.data_parallel_shard_degree) == (1, 1, 2)
    assert p.disable_sequence_parallel
    assert (jc.checkpoint.enable, jc.checkpoint.interval, jc.checkpoint.folder) == (True, 50, "./ckpts")
    assert jc.checkpoint.initial_load_path is None
    assert jc.activation_checkpoint.mode == "full"  # gradient_checkpointing true wins
    assert t.enable_cpu_offload
    args = get_train_spec("llama3").model_args[jc.model.flavor]
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size, args.rope_theta,
            args.max_seq_len, args.ffn_hidden_dim) == (128, 3, 4, 2, 32000, 10000.0, 512, 352)


def test_page_dict_and_toml_give_the_same_job_config(tmp_path, caplog):
    titan_logger = logging.getLogger("torchtitan")
    titan_logger.addHandler(caplog.handler)  # torchtitan's logger does not propagate
    level = titan_logger.level
    titan_logger.setLevel(logging.INFO)
    try:
        from_dict = TorchTitanPlugin(job_config=PAGE_CONFIG, model_name="llama3").job_config
    finally:
        titan_logger.removeHandler(caplog.handler)
        titan_logger.setLevel(level)
    assert_page_config(from_dict)
    logged = caplog.text
    for key, ours in [("training.batch_size", "training.local_batch_size"),
                      ("parallelism.data_parallel", "parallelism.data_parallel_shard_degree"),
                      ("memory.cpu_offload", "training.enable_cpu_offload"),
                      ("model.embed_dim", "custom flavor field dim")]:
        assert f"{key}=" in logged and ours in logged
    path = tmp_path / "page.toml"
    path.write_text(PAGE_TOML)
    from_toml = TorchTitanPlugin(job_config=str(path)).job_config
    assert_page_config(from_toml)
    assert from_toml.model.flavor == from_dict.model.flavor


def test_job_config_from_dict_and_toml_match_the_cli(tmp_path):
    d = {"training": {"steps": 7, "local_batch_size": 2}, "parallelism": {"tensor_parallel_degree": 2}}
    jc = JobConfig.from_dict(d)
    cli = ConfigManager().parse_args(["--training.steps", "7", "--training.local_batch_size", "2",
                                      "--parallelism.tensor_parallel_degree", "2"])
    assert jc == cli
    path = tmp_path / "ours.toml"
    path.write_text("[training]\nsteps = 7\nlocal_batch_size = 2\n[parallelism]\ntensor_parallel_degree = 2\n")
    from_toml = JobConfig.from_toml(path)
    assert from_toml.job.config_file == str(path)
    from_toml.job.config_file = cli.job.config_file
    assert from_toml == cli
    assert Trainer.__name__ == "Trainer"


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"training": {"steps": 0}}, "training.steps"),
        ({"training": {"stepz": 3}}, "did you mean training.steps?"),
        ({"trainig": {"steps": 3}}, "did you mean [training]?"),
    ],
)
def test_job_config_from_dict_errors(data, expected):
    with pytest.raises(ConfigError, match=r"^[^\n]*$") as e:
        JobConfig.from_dict(data)
    assert expected in str(e.value)


def test_environment_and_precedence(monkeypatch, tmp_path):
    env = {"TORCHTITAN_TP_SIZE": "2", "TORCHTITAN_PP_SIZE": "1", "TORCHTITAN_DP_SIZE": "4",
           "TORCHTITAN_MODEL_NAME": "llama3", "TORCHTITAN_CHECKPOINT_DIR": "/ck",
           "TORCHTITAN_ACTIVATION_CHECKPOINTING": "true"}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    jc = TorchTitanPlugin().job_config  # defaults < env
    p = jc.parallelism
    assert (p.tensor_parallel_degree, p.pipeline_parallel_degree, p.data_parallel_shard_degree) == (2, 1, 4)
    assert (jc.checkpoint.folder, jc.checkpoint.enable, jc.activation_checkpoint.mode) == ("/ck", True, "full")
    # env < explicit (both shapes), untouched keys keep the env value
    explicit = {"parallelism": {"tensor_parallel": 1, "data_parallel_shard_degree": 8}}
    jc = TorchTitanPlugin(job_config=explicit).job_config
    assert (jc.parallelism.tensor_parallel_degree, jc.parallelism.data_parallel_shard_degree) == (1, 8)
    assert jc.checkpoint.folder == "/ck"
    # TORCHTITAN_CONFIG_PATH is used when no job_config is given; single env vars override it
    path = tmp_path / "env.toml"
    path.write_text("[training]\nmax_steps = 33\n[parallelism]\ntensor_parallel = 4\n")
    monkeypatch.setenv("TORCHTITAN_CONFIG_PATH", str(path))
    jc = TorchTitanPlugin().job_config
    assert (jc.training.steps, jc.parallelism.tensor_parallel_degree) == (33, 2)
    assert TorchTitanPlugin(job_config={}).job_config.training.steps == JobConfig().training.steps
    # explicit model_name beats the env's
    monkeypatch.setenv("TORCHTITAN_MODEL_NAME", "no_such_model")
    assert resolve_job_config(None, model_name="llama3")[0].model.name == "llama3"


@pytest.mark.parametrize(
    "var, value, expected",
    [("TORCHTITAN_TP_SIZE", "two", "TORCHTITAN_TP_SIZE"), ("TORCHTITAN_GRADIENT_CHECKPOINTING", "maybe",
                                                            "TORCHTITAN_GRADIENT_CHECKPOINTING")],
)
def test_bad_environment_values(monkeypatch, var, value, expected):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=expected):
        TorchTitanPlugin()


@pytest.mark.parametrize(
    "job_config, expected",
    [
        ({"training": {"batch_sz": 2}}, "unknown config key training.batch_sz (the job_config dict); did you mean "
                                        "training.batch_size?"),
        ({"memroy": {"cpu_offload": True}}, "did you mean [memory]?"),
        ({"model": {"embed_dim": 64, "num_heads": 5}}, "dim 64, n_heads 5"),
        ({"training": {"max_steps": -1}}, "training.steps"),
    ],
)
def test_plugin_config_errors(job_config, expected):
    with pytest.raises(ConfigError, match=r"^[^\n]*$") as e:
        plugin = TorchTitanPlugin(job_config=job_config)
        # sizes are checked when the flavor's model is built (as in the trainer)
        from torchtitan.protocols.train_spec import build_meta_model

        build_meta_model(get_train_spec("llama3"), plugin.job_config)
    assert expected in str(e.value)


def test_toml_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        TorchTitanPlugin(job_config=tmp_path / "missing.toml")


def _with_degree(name: str) -> JobConfig:
    """A JobConfig with a PP/CP degree of 2 set after validation (which refuses them while unbuilt)."""
    jc = JobConfig()
    setattr(jc.parallelism, name, 2)
    return jc


def _prepared(**kwargs):
    return Accelerator(torchtitan_plugin=TorchTitanPlugin(job_config={"debug": {"seed": 1}}), **kwargs)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Accelerator(), "ACCELERATE_USE_TORCHTITAN=true"),
        (lambda: _prepared(mixed_precision="fp16"), "mixed_precision='fp16'"),
        (lambda: _prepared(gradient_accumulation_steps=0), "gradient_accumulation_steps=0"),
        (lambda: Accelerator(TorchTitanPlugin(job_config=_with_degree("pipeline_parallel_degree"))),
         "parallelism.pipeline_parallel_degree=2 needs torchtitan's own training loop; use "
         "TorchTitanPlugin(...).trainer().train() or ./run_train.sh"),
        (lambda: Accelerator(TorchTitanPlugin(job_config=_with_degree("context_parallel_degree"))),
         "parallelism.context_parallel_degree=2 needs torchtitan's own training loop"),
        (lambda: Accelerator(TorchTitanPlugin(job_config={"parallelism": {"tensor_parallel": 2}})),
         "world size 1"),
    ],
)
def test_accelerator_errors(make, expected):
    with pytest.raises(ConfigError, match=r"^[^\n]*$") as e:
        make()
    assert expected in str(e.value)


def test_accelerator_from_environment(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_TORCHTITAN", "true")
    monkeypatch.setenv("TORCHTITAN_ACTIVATION_CHECKPOINTING", "false")
    accelerator = Accelerator()
    assert accelerator.job_config.activation_checkpoint.mode == "none"
    assert (accelerator.num_processes, accelerator.process_index, accelerator.is_main_process) == (1, 0, True)


def test_prepare_errors(tmp_path):
    accelerator = _prepared()
    model = nn.Linear(4, 4)
    stray = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="pass the model and its optimizer to the same prepare"):
        accelerator.prepare(model, stray)
    dataset = TensorDataset(torch.arange(8))
    sampler_loader = DataLoader(dataset, batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(ConfigError, match="custom batch_sampler"):
        accelerator.prepare(sampler_loader)
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        accelerator.load_state(str(tmp_path / "nothing"))


def test_prepare_single_process_keeps_optimizer_and_order(tmp_path):
    """One process: the optimizer keeps its class, groups and hyperparameters; the scheduler steps once
    per optimizer step under accumulation; the dataloader order and position resume from save_state."""
    accelerator = _prepared(gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 0.1},
                                   {"params": model[1].parameters(), "weight_decay": 0.0}], lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    loader = DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=2, shuffle=True)
    loader, scheduler, optimizer, model = accelerator.prepare(loader, scheduler, optimizer, model)
    assert type(optimizer.optimizer) is torch.optim.AdamW
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.01]
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    seen = []
    for i, (x,) in enumerate(loader):
        seen.append(x)
        with accelerator.accumulate(model):
            accelerator.backward(model(x).sum())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if i == 1:
            accelerator.save_state(str(tmp_path / "state"))
    assert len(seen) == 6
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1 * 0.5**3)  # 6 microbatches = 3 steps
    weights = [p.detach().clone() for p in model.parameters()]
    accelerator.load_state(str(tmp_path / "state"))
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1 * 0.5)
    rest = [x for (x,) in loader]
    assert all(torch.equal(a, b) for a, b in zip(rest, seen[2:], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    accelerator.save_model(model, str(tmp_path / "export"))
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert accelerator.unwrap_model(model) is model


def test_plugin_trainer_trains_the_custom_flavor(tmp_path):
    """`TorchTitanPlugin(...).trainer()` is our Trainer, built from an Accelerate-shaped dict."""
    plugin = TorchTitanPlugin(model_name="llama3", job_config={
        "job": {"dump_folder": str(tmp_path)},
        "model": {"embed_dim": 32, "num_layers": 1, "num_heads": 2},
        "training": {"dataset": "shakespeare", "batch_size": 2, "seq_len": 32, "max_steps": 2,
                     "mixed_precision_param": "float32"},
        "lr_scheduler": {"warmup_steps": 1},
    })
    trainer = plugin.trainer()
    try:
        assert isinstance(trainer, Trainer)
        assert (trainer.model_args.dim, trainer.model_args.n_layers) == (32, 1)
        trainer.train()
        assert trainer.step == 2
    finally:
        trainer.close()


def _tiny_llama_losses(compile_model: bool, steps: int = 2) -> list[float]:
    """Train a 2-layer transformers Llama prepared with per-block compile on or off, from fixed weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    job = {"debug": {"seed": 1}, "compile": {"enable": compile_model, "backend": "aot_eager"}}
    accelerator = Accelerator(torchtitan_plugin=TorchTitanPlugin(job_config=job))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_prepare_with_compile_matches_eager():
    """`compile.enable` compiles each decoder layer of a transformers model; the losses equal eager ones."""
    from torch._dynamo.utils import counters

    eager = _tiny_llama_losses(False)
    counters.clear()
    compiled = _tiny_llama_losses(True)
    assert counters["stats"]["unique_graphs"] >= 1  # the layers did go through dynamo
    assert compiled == pytest.approx(eager, rel=1e-5) and compiled[1] < compiled[0]
