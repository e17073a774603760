"""Dotted module paths of the generic parallel helpers: ModuleList or ModuleDict containers, None modules
skipped (absent on a pipeline stage), a path that does not exist an error."""

import pytest
import torch.nn as nn

from torchtitan.config import ConfigError, JobConfig
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.compile import apply_compile
from torchtitan.distributed.module_paths import block_container, present_modules, resolve_module
from torchtitan.distributed.tensor_parallel import _resolves


def model() -> nn.Module:
    root = nn.Module()
    root.model = nn.Module()
    root.model.embed_tokens = nn.Embedding(4, 2)
    root.model.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    root.model.norm = None  # removed, as a pipeline stage without it would have it
    root.lm_head = nn.Linear(2, 4)
    return root


def test_paths_resolve_skip_none_and_reject_missing():
    m = model()
    assert resolve_module(m, "model.embed_tokens") is m.model.embed_tokens
    assert present_modules(m, ("model.norm", "lm_head")) == [m.lm_head]
    with pytest.raises(AttributeError, match="no module at 'model.nrom'"):
        present_modules(m, ("model.nrom",))
    assert _resolves(m, "model.layers.*.weight") and not _resolves(m, "model.norm")
    with pytest.raises(AttributeError, match="'layerz'"):
        _resolves(m, "model.layerz.*.q_proj")
    with pytest.raises(TypeError, match="not a ModuleDict/ModuleList"):
        block_container(m, "lm_head")


def test_ac_wraps_blocks_of_a_module_list_at_a_dotted_path():
    m = model()
    ac = JobConfig().activation_checkpoint
    ac.mode, ac.selective_ac_option = "selective", "2"
    apply_ac(m, ac, "model.layers")
    wrapped = ["_checkpoint_wrapped_module" in dict(b.named_children()) for b in m.model.layers]
    assert wrapped == [False, True]


@pytest.mark.parametrize("option, inside", [("1", True), ("op", False)])
def test_compile_goes_inside_a_full_block_checkpoint_and_around_op_sac(option, inside):
    """A full-block checkpoint runs around the compiled block (traced, it fails under TP in torch 2.13);
    op-level SAC is compiled with the block, so its policy sees the ops."""
    m = model()
    ac = JobConfig().activation_checkpoint
    ac.mode, ac.selective_ac_option = "selective", option
    apply_ac(m, ac, "model.layers")
    apply_compile(m, JobConfig().compile, "model.layers")
    for wrapper in m.model.layers:
        assert (wrapper._checkpoint_wrapped_module._compiled_call_impl is not None) is inside
        assert (wrapper._compiled_call_impl is not None) is not inside


def test_pipeline_split_at_a_dotted_module_list_keeps_fqns_and_parameterless_modules():
    from torchtitan.distributed.pipeline_parallel import check_fqns, fqns_per_stage, split_module

    m = model()
    m.model.norm = nn.LayerNorm(2)
    m.model.rotary_emb = nn.Identity()  # no parameters: on every stage, in no stage list
    parts_fqns = fqns_per_stage(2, 2, 0, 0, ["model.embed_tokens"], ["model.norm", "lm_head"], "model.layers")
    assert parts_fqns == [["model.embed_tokens", "model.layers.0"], ["model.layers.1", "model.norm", "lm_head"]]
    check_fqns(m, parts_fqns, "model.layers")
    parts = [split_module(m, names, "model.layers") for names in parts_fqns]
    assert parts[0].lm_head is None and parts[1].model.embed_tokens is None
    assert all(isinstance(p.model.rotary_emb, nn.Identity) for p in parts)
    assert list(parts[1].model.layers.keys()) == ["1"]
    assert sorted(k for p in parts for k in p.state_dict()) == sorted(m.state_dict())
    with pytest.raises(ConfigError, match="leaves lm_head, model.norm in no stage"):
        check_fqns(m, [parts_fqns[0], ["model.layers.1"]], "model.layers")
