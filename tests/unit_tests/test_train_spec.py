"""TrainSpec registry, the registered llama3 spec, and the model-converter registry."""

from types import SimpleNamespace

import pytest
from torch import nn

from torchtitan.config import ConfigError, JobConfig
from torchtitan.protocols import model_converter, train_spec
from torchtitan.protocols.model import BaseModelArgs, ModelProtocol
from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec


def dummy_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=nn.Linear, model_args={"tiny": BaseModelArgs()}, parallelize_fn=lambda m, pd, jc: m,
        pipelining_fn=None, build_optimizers_fn=print, build_lr_schedulers_fn=print, build_dataloader_fn=print,
        build_tokenizer_fn=print, build_loss_fn=print,
    )


def test_register_and_get(monkeypatch):
    monkeypatch.setattr(train_spec, "_train_specs", dict(train_spec._train_specs))
    spec = dummy_spec()
    register_train_spec("tiny_model", spec)
    assert get_train_spec("tiny_model") is spec
    assert (spec.build_validator_fn, spec.state_dict_adapter) == (None, None)
    with pytest.raises(ValueError, match="'tiny_model' is already registered"):
        register_train_spec("tiny_model", spec)
    unknown = r"model.name='nope' is not a registered model; choose one of \[.*'llama3'.*'tiny_model'.*'transformers_modeling_backend'\]"
    with pytest.raises(ConfigError, match=unknown):
        get_train_spec("nope")


def test_llama3_spec():
    from torchtitan.components.dataloader import build_text_dataloader
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.components.tokenizer import build_tokenizer
    from torchtitan.components.validate import build_validator
    from torchtitan.models.llama3 import Llama3StateDictAdapter, Transformer, TransformerModelArgs, llama3_args
    from torchtitan.models.llama3.infra.parallelize import parallelize_llama
    from torchtitan.models.llama3.infra.pipeline import pipeline_llama

    spec = get_train_spec("llama3")
    assert spec.model_cls is Transformer and spec.model_args is llama3_args
    # (custom_* flavors are the process-local ones an Accelerate-style config registers)
    assert {f for f in spec.model_args if not f.startswith("custom_")} == {"debugmodel", "8B", "70B", "405B"}
    assert (spec.parallelize_fn, spec.pipelining_fn, spec.build_validator_fn) == (
        parallelize_llama, pipeline_llama, build_validator
    )
    assert spec.state_dict_adapter is Llama3StateDictAdapter
    assert (spec.build_optimizers_fn, spec.build_lr_schedulers_fn, spec.build_dataloader_fn) == (
        build_optimizers, build_lr_schedulers, build_text_dataloader
    )
    assert (spec.build_tokenizer_fn, spec.build_loss_fn) == (build_tokenizer, build_cross_entropy_loss)
    assert isinstance(Transformer(TransformerModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=4)), ModelProtocol)


class Recorder:
    """A converter that records the order in which it ran."""

    def __init__(self, job_config, parallel_dims):
        self.tag = job_config.tag

    def convert(self, model):
        model.log.append(f"convert {self.tag}")

    def post_optimizer_hook(self, model):
        model.log.append(f"hook {self.tag}")


def test_model_converters(monkeypatch):
    monkeypatch.setattr(model_converter, "_converters", {})
    model_converter.register_model_converter(Recorder, "a")
    model_converter.register_model_converter(type("B", (Recorder,), {}), "b")
    with pytest.raises(ValueError, match="'a' is already registered"):
        model_converter.register_model_converter(Recorder, "a")
    job = SimpleNamespace(model=SimpleNamespace(converters=["b", "a"], print_after_conversion=False), tag="t")
    container = model_converter.build_model_converters(job)
    model = SimpleNamespace(log=[])
    container.convert(model)
    container.post_optimizer_hook(model)
    assert [type(c).__name__ for c in container.converters] == ["B", "Recorder"]
    assert model.log == ["convert t", "convert t", "hook t", "hook t"]
    job.model.converters = ["a", "float9"]
    unknown = r"model.converters: unknown converter\(s\) \['float9'\]; choose from \['a', 'b'\]"
    with pytest.raises(ConfigError, match=unknown):
        model_converter.build_model_converters(job)


def test_no_converters_is_a_no_op():
    container = model_converter.build_model_converters(JobConfig())
    assert container.converters == []
    container.convert(nn.Linear(2, 2))
