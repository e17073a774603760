"""Pipeline-parallel planning without processes: stage splits, placement, FQN stability, schedule and
microbatch checks, and the token-normalized loss."""

from types import SimpleNamespace

import pytest
import torch

from torchtitan.components.loss import TokenNormalizedLoss, cross_entropy_loss
from torchtitan.config.errors import ConfigError
from torchtitan.distributed import pipeline_parallel as ppl
from torchtitan.models.llama3 import Transformer, TransformerModelArgs

IN, OUT = ("tok_embeddings",), ("norm", "output")


def pc(schedule="1F1B", fqns=None, layers_per_stage=None, csv=""):
    return SimpleNamespace(
        pipeline_parallel_schedule=schedule, module_fqns_per_model_part=fqns,
        pipeline_parallel_layers_per_stage=layers_per_stage, pipeline_parallel_first_stage_less_layers=1,
        pipeline_parallel_last_stage_less_layers=1, pipeline_parallel_schedule_csv=csv,
    )


def meta_llama(n_layers=6):
    with torch.device("meta"):
        return Transformer(TransformerModelArgs(dim=64, n_layers=n_layers, n_heads=4, vocab_size=128))


def test_split_counts_embedding_and_output_as_layers():
    assert ppl.fqns_per_stage(2, 6, 1, 1, IN, OUT) == [
        ["tok_embeddings", "layers.0", "layers.1", "layers.2"], ["layers.3", "layers.4", "layers.5", "norm", "output"]
    ]
    four = ppl.fqns_per_stage(4, 6, 1, 1, IN, OUT)
    assert four == [["tok_embeddings", "layers.0"], ["layers.1", "layers.2"], ["layers.3", "layers.4"],
                    ["layers.5", "norm", "output"]]
    # remainders go to the middle stages first
    assert [len(s) for s in ppl.fqns_per_stage(4, 7, 1, 1, IN, OUT)] == [2, 3, 2, 3]
    with pytest.raises(ConfigError, match="cannot fill 8 pipeline stages"):
        ppl.fqns_per_stage(8, 3, 1, 1, IN, OUT)


def test_stage_placement_loop_and_v():
    assert ppl.stage_ids_this_rank(1, 2, 4, v_style=False) == [1, 3]
    assert ppl.stage_ids_this_rank(0, 2, 4, v_style=True) == [0, 3]
    assert ppl.stage_ids_this_rank(1, 4, 8, v_style=True) == [1, 6]


def test_stage_count_rules():
    single, multi = ppl.schedule_class("1f1b"), ppl.schedule_class("INTERLEAVED1F1B")
    assert ppl.num_stages(single, 2, 6, pc()) == 2 and ppl.num_stages(multi, 2, 6, pc()) == 4
    assert ppl.num_stages(multi, 2, 6, pc(layers_per_stage=2)) == 4  # ceil(8 / 2)
    with pytest.raises(ConfigError, match="pipeline_parallel_layers_per_stage=3 gives 3 pipeline stages"):
        ppl.num_stages(multi, 2, 6, pc(layers_per_stage=3))
    with pytest.raises(ConfigError, match="runs one stage per rank"):
        ppl.num_stages(single, 2, 6, pc(layers_per_stage=2))
    with pytest.raises(ConfigError, match="needs exactly 2"):
        ppl.num_stages(ppl.schedule_class("DualPipeV"), 2, 6, pc(layers_per_stage=1))


def test_unknown_schedule_lists_the_names():
    with pytest.raises(ConfigError) as e:
        ppl.schedule_class("zigzag")
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in ppl.SCHEDULES)
    with pytest.raises(ConfigError):
        ppl.schedule_class("PipelineScheduleMulti")  # only with a CSV
    assert ppl.schedule_class("PipelineScheduleMulti", "x.csv").__name__ == "PipelineScheduleMulti"


def test_microbatch_checks():
    cls = ppl.schedule_class("ZBVZeroBubble")
    assert ppl.microbatch_count(cls, 8, 2, 2, 2) == 4
    with pytest.raises(ConfigError, match="pipeline_parallel_microbatch_size=3"):
        ppl.microbatch_count(cls, 8, 3, 2, 2)
    with pytest.raises(ConfigError, match="at least 4 microbatches"):
        ppl.microbatch_count(cls, 8, 4, 2, 2)


def test_split_module_keeps_fqns_and_covers_the_model():
    model = meta_llama()
    parts_fqns = ppl.fqns_per_stage(4, 6, 1, 1, IN, OUT)
    parts = [ppl.split_module(model, names) for names in parts_fqns]
    keys = [k for part in parts for k in part.state_dict()]
    assert sorted(keys) == sorted(model.state_dict()) and len(keys) == len(set(keys))
    assert parts[1].tok_embeddings is None and list(parts[1].layers.keys()) == ["1", "2"]
    assert parts[3].output is not None and parts[0].output is None
    ppl.check_fqns(model, parts_fqns)
    with pytest.raises(ConfigError, match="'layers.9'"):
        ppl.check_fqns(model, [["tok_embeddings", "layers.9"]])
    with pytest.raises(ConfigError, match="leaves .*norm, output in no stage"):
        ppl.check_fqns(model, [["tok_embeddings", *[f"layers.{i}" for i in range(6)]]])


def test_token_normalized_loss_sums_to_one_batch_mean():
    logits, labels = torch.randn(4, 5, 11), torch.randint(0, 11, (4, 5))
    labels[0, :2] = -100
    loss = TokenNormalizedLoss(cross_entropy_loss)
    loss.global_tokens = int((labels != -100).sum())
    parts = sum(loss(logits[i : i + 1], labels[i : i + 1]) for i in range(4))
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1), ignore_index=-100)
    torch.testing.assert_close(parts, expected)
