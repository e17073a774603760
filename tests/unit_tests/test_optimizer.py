"""OptimizersContainer / build_optimizers: config mapping, implementations, state round trips (plain and DTensor)."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from torchtitan.components import optimizer as optimizer_module
from torchtitan.components.optimizer import build_optimizers
from torchtitan.config import ConfigError, JobConfig


def _parts(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)), nn.Linear(4, 3)]


def _train(parts: list[nn.Module], optimizers, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=gen)
        parts[1](parts[0](x)).pow(2).sum().backward()
        optimizers.step()
        optimizers.zero_grad()


def _config(**overrides):
    return replace(JobConfig().optimizer, **overrides)


@pytest.mark.parametrize(
    "implementation, fused, foreach", [("fused", True, False), ("foreach", False, True), ("for-loop", False, False)]
)
def test_config_maps_to_optimizer_kwargs(implementation, fused, foreach):
    cfg = _config(
        name="Adam", lr=3e-4, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.05, implementation=implementation
    )
    optimizers = build_optimizers(_parts(), cfg, None)
    assert len(optimizers) == 2
    for opt in optimizers:
        assert type(opt) is torch.optim.Adam
        group = opt.param_groups[0]
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.8, 0.9), 1e-6, 0.05)
        assert (group["fused"], group["foreach"]) == (fused, foreach)


def test_implementations_agree():
    results = []
    for implementation in ("fused", "foreach", "for-loop"):
        parts = _parts()
        _train(parts, build_optimizers(parts, _config(implementation=implementation), None), steps=3)
        results.append(torch.cat([p.detach().flatten() for part in parts for p in part.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[1], results[2], rtol=0, atol=1e-6)
    assert not torch.equal(results[0], torch.cat([p.flatten() for part in _parts() for p in part.parameters()]))


def test_adamw_decoupled_weight_decay_value():
    # One AdamW step from zero gradient: Adam's update is 0, so only decay acts: w * (1 - lr * wd).
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -4.0]]))
    optimizers = build_optimizers([layer], _config(lr=0.1, weight_decay=0.5), None)
    layer.weight.grad = torch.zeros_like(layer.weight)
    optimizers.step()
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[1.9, -3.8]]))


def test_fused_falls_back_with_warning(monkeypatch, captured_warnings):
    monkeypatch.setattr(optimizer_module, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    optimizers = build_optimizers(_parts(), _config(implementation="fused"), None)
    assert all((o.param_groups[0]["fused"], o.param_groups[0]["foreach"]) == (False, True) for o in optimizers)
    assert "optimizer.implementation='fused' is not available for parameters on ['cpu']; using 'foreach'" in (
        captured_warnings.text
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "SGD"}, "optimizer.name='SGD' is not supported: use one of Adam, AdamW"),
        ({"implementation": "triton"}, "optimizer.implementation='triton' is not supported"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_optimizers(_parts(), _config(**overrides), None)


def test_param_groups_are_shared_and_hooks_run_once_per_step():
    parts = _parts()
    optimizers = build_optimizers(parts, _config(), None)
    assert len(optimizers.param_groups) == 2
    optimizers.param_groups[1]["lr"] = 0.123
    assert optimizers.optimizers[1].param_groups[0]["lr"] == 0.123
    calls = []
    optimizers.register_step_post_hook(lambda opt, args, kwargs: calls.append(opt))
    _train(parts, optimizers, steps=2)
    assert calls == [optimizers, optimizers]


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, torch.Tensor):
            va, vb = (v.full_tensor() if hasattr(v, "full_tensor") else v for v in (va, vb))
            assert torch.equal(va, vb), key
        else:
            assert va == vb, key


def _round_trip(make_parts) -> None:
    parts = make_parts()
    optimizers = build_optimizers(parts, _config(), None)
    _train(parts, optimizers, steps=3)
    # a copy: the state dict holds the live state tensors, which the next steps update in place
    state = copy.deepcopy(optimizers.state_dict())

    fresh_parts = make_parts()
    for fresh, trained in zip(fresh_parts, parts):
        fresh.load_state_dict(trained.state_dict())
    fresh_optimizers = build_optimizers(fresh_parts, _config(), None)
    fresh_optimizers.load_state_dict(state)
    _assert_state_equal(fresh_optimizers.state_dict(), state)

    # continuing from the restored state matches continuing the original
    _train(parts, optimizers, steps=2, seed=7)
    _train(fresh_parts, fresh_optimizers, steps=2, seed=7)
    for fresh, trained in zip(fresh_parts, parts):
        for (name, p), q in zip(trained.named_parameters(), fresh.parameters()):
            assert torch.equal(p.detach(), q.detach()), name


def test_state_dict_round_trip_without_process_group():
    assert not dist.is_initialized()
    parts = _parts()
    optimizers = build_optimizers(parts, _config(), None)
    _train(parts, optimizers, steps=3)
    state = optimizers.state_dict()
    # flattened keys by parameter FQN, both parts merged; step counts are exact
    assert "state.0.weight.exp_avg" in state and "state.weight.exp_avg_sq" in state
    assert "param_groups.1.bias.lr" in state
    assert float(state["state.weight.step"]) == 3.0
    _round_trip(_parts)


@pytest.fixture
def single_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_state_dict_round_trip_with_dtensor_params(single_rank_group):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def make_parts():
        parts = _parts()
        for part in parts:
            fully_shard(part, mesh=single_rank_group)
        return parts

    parts = make_parts()
    assert isinstance(parts[1].weight, DTensor)
    optimizers = build_optimizers(parts, _config(implementation="fused"), None)
    _train(parts, optimizers, steps=1)
    assert isinstance(optimizers.state_dict()["state.weight.exp_avg"], DTensor)
    _round_trip(make_parts)
