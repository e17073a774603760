"""cross_entropy_loss: summed token CE with ignore_index, fp32 upcast, compile wrapping, DTensor under loss_parallel."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from torchtitan.components.loss import build_cross_entropy_loss, cross_entropy_loss
from torchtitan.config import JobConfig


def _batch(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen).to(dtype)
    labels = torch.randint(0, 11, (2, 5), generator=gen)
    labels[0, 1] = labels[1, 4] = -100
    return logits, labels


def _manual_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over non-ignored tokens of logsumexp(z) - z[label], in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for row, label in zip(logits.double().reshape(-1, logits.shape[-1]), labels.reshape(-1).tolist()):
        if label != -100:
            total += torch.log(torch.exp(row).sum()) - row[label]
    return total


def test_sum_over_tokens_skips_ignored():
    logits, labels = _batch()
    loss = cross_entropy_loss(logits, labels)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), _manual_sum(logits, labels), rtol=1e-6, atol=1e-5)
    # dividing by the 8 valid tokens gives the mean CE
    torch.testing.assert_close(
        loss / 8, torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1)), rtol=1e-6, atol=1e-6
    )


def test_known_value():
    # uniform logits over V classes: each token costs log(V)
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[0, -100, 3]])
    torch.testing.assert_close(cross_entropy_loss(logits, labels), torch.tensor(2 * 1.3862943611198906))


def test_all_ignored_is_zero():
    logits, _ = _batch()
    assert cross_entropy_loss(logits, torch.full((2, 5), -100)).item() == 0.0


def test_bf16_logits_are_upcast():
    logits, labels = _batch(torch.bfloat16)
    loss = cross_entropy_loss(logits, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), _manual_sum(logits.float(), labels), rtol=1e-6, atol=1e-5)


def test_gradient_is_softmax_minus_onehot():
    logits, labels = _batch()
    logits.requires_grad_(True)
    cross_entropy_loss(logits, labels).backward()
    expected = torch.softmax(logits.detach(), dim=-1)
    valid = labels != -100
    expected[valid] -= torch.nn.functional.one_hot(labels[valid], 11).float()
    expected[~valid] = 0.0
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize("enable, components", [(False, ["model", "loss"]), (True, ["model"])])
def test_build_without_compile_returns_plain_function(enable, components):
    job_config = JobConfig()
    job_config.compile = replace(job_config.compile, enable=enable, components=components)
    assert build_cross_entropy_loss(job_config) is cross_entropy_loss


def test_build_with_compile():
    job_config = JobConfig()
    # the eager backend exercises torch.compile wrapping without inductor's C++ build time
    job_config.compile = replace(job_config.compile, enable=True, components=["loss"], backend="eager")
    loss_fn = build_cross_entropy_loss(job_config)
    assert loss_fn is not cross_entropy_loss
    logits, labels = _batch()
    torch.testing.assert_close(loss_fn(logits, labels), cross_entropy_loss(logits, labels))


def test_dtensor_logits_under_loss_parallel():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        logits, labels = _batch()
        sharded = distribute_tensor(logits, mesh, [Shard(2)]).requires_grad_(True)
        with loss_parallel():
            loss = cross_entropy_loss(sharded, labels)
            loss.backward()
        assert isinstance(loss, DTensor)
        torch.testing.assert_close(loss.full_tensor(), cross_entropy_loss(logits, labels))
        plain = logits.clone().requires_grad_(True)
        cross_entropy_loss(plain, labels).backward()
        torch.testing.assert_close(sharded.grad.full_tensor(), plain.grad)
    finally:
        dist.destroy_process_group()
