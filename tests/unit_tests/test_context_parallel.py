"""Context parallelism: sequence sharding by the load balancers, our all-gather-KV attention against full
causal SDPA (forward and q/k/v gradients, both balancers, GQA; the CPU flash path and the masked path of
other devices) and a CP Llama against one process, on 2 and
4 gloo ranks; and the one-line errors for options a device does not have."""

import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from torchtitan.config import ConfigError
from torchtitan.distributed.context_parallel import (
    ContextParallel,
    apply_cp,
    resolve_implementation,
    token_positions,
)
from torchtitan.distributed.context_parallel_attention import masked_allgather_kv_attention
from torchtitan.models.attention import ScaledDotProductAttention
from torchtitan.models.llama3 import Transformer, TransformerModelArgs
from torchtitan.tools.profiling import saved_activations

SEQ = 16
VOCAB = 128
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("balancer", ["headtail", "none"])
def test_every_position_held_by_exactly_one_rank(cp, balancer):
    held = torch.cat([token_positions(SEQ, cp, r, balancer) for r in range(cp)])
    assert sorted(held.tolist()) == list(range(SEQ))


@pytest.mark.parametrize("cp", [2, 4])
def test_headtail_balances_causal_work(cp):
    """Each query attends to position + 1 keys: headtail gives every rank the same total, none does not."""
    def work(balancer):
        return [int((token_positions(SEQ, cp, r, balancer) + 1).sum()) for r in range(cp)]

    assert len(set(work("headtail"))) == 1
    assert work("none") == sorted(work("none")) and len(set(work("none"))) == cp
    assert token_positions(SEQ, cp, 0, "headtail").tolist() == [*range(SEQ // (2 * cp)),
                                                                 *range(SEQ - SEQ // (2 * cp), SEQ)]


def test_implementation_choice_per_device():
    assert resolve_implementation("auto", "allgather", "cpu") == "allgather_kv"
    assert resolve_implementation("auto", "alltoall", "cuda") == "torch_ring"
    assert resolve_implementation("allgather_kv", "allgather", "cuda") == "allgather_kv"
    with pytest.raises(ConfigError, match="context_parallel_attention=torch_ring needs CUDA"):
        resolve_implementation("torch_ring", "allgather", "cpu")
    with pytest.raises(ConfigError, match="context_parallel_rotate_method=alltoall applies only to torch_ring"):
        resolve_implementation("auto", "alltoall", "cpu")


def _check_attention(mesh, balancer: str, heads: int, kv_heads: int) -> None:
    """CP attention output and q/k/v gradients equal this rank's rows of full causal SDPA's."""
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    q = torch.randn(2, heads, SEQ, 8, generator=g, requires_grad=True)
    k = torch.randn(2, kv_heads, SEQ, 8, generator=g, requires_grad=True)
    v = torch.randn(2, kv_heads, SEQ, 8, generator=g, requires_grad=True)
    grad_out = torch.randn(2, heads, SEQ, 8, generator=g)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    full.backward(grad_out)

    pos = token_positions(SEQ, mesh.size(), mesh.get_local_rank(), balancer)
    attention = ContextParallel(mesh, balancer, "allgather_kv").attention()
    for impl in (attention, functools.partial(masked_allgather_kv_attention, layout=attention.layout)):
        local = [t.detach()[:, :, pos].requires_grad_() for t in (q, k, v)]
        out = impl(*local)
        out.backward(grad_out[:, :, pos])
        torch.testing.assert_close(out, full.detach()[:, :, pos], **TOL)
        for name, mine, ref in zip("qkv", local, (q, k, v)):
            torch.testing.assert_close(mine.grad, ref.grad[:, :, pos], **TOL, msg=lambda m: f"d{name}: {m}")


def _check_llama(mesh, balancer: str) -> None:
    """A GQA Llama with CP attention, sharded tokens and its RoPE table at the true positions: logits equal
    the full model's rows, and parameter gradients summed over ranks equal the full model's."""
    torch.manual_seed(0)
    args = TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32,
                                max_seq_len=2 * SEQ)
    full, cp_model = Transformer(args), Transformer(args)
    full.init_weights()
    cp_model.load_state_dict(full.state_dict())
    cp = ContextParallel(mesh, balancer, "allgather_kv")
    apply_cp(cp_model, cp, ScaledDotProductAttention)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    ref = full(tokens)
    ref.sum().backward()
    (local_tokens,) = cp.shard(tokens)
    table = cp_model.freqs_cis
    with cp.rope_context([cp_model], SEQ):
        logits = cp_model(local_tokens)
        logits.sum().backward()
    assert cp_model.freqs_cis is table  # restored
    torch.testing.assert_close(logits, ref.detach()[:, cp.positions(SEQ)], **TOL)
    for (name, p), p_full in zip(cp_model.named_parameters(), full.parameters()):
        dist.all_reduce(p.grad)
        torch.testing.assert_close(p.grad, p_full.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the distinct storages a forward saves for backward, parameters excluded."""
    with saved_activations(model) as saved:
        model(tokens)
    return sum(saved.values())


def _check_saved_activations(mesh) -> None:
    """Each CP rank saves for backward at most 1.1 / cp of what one process saves for the whole sequence
    (no rank keeps the gathered K/V of every layer)."""
    seq = 256
    args = TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32,
                                max_seq_len=seq)
    full, cp_model = Transformer(args), Transformer(args)
    full.init_weights()
    cp_model.load_state_dict(full.state_dict())
    cp = ContextParallel(mesh, "headtail", "allgather_kv")
    apply_cp(cp_model, cp, ScaledDotProductAttention)
    tokens = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(2))
    with cp.rope_context([cp_model], seq):
        per_rank = _saved_activation_bytes(cp_model, cp.shard(tokens)[0])
    assert per_rank <= 1.1 * _saved_activation_bytes(full, tokens) / mesh.size()


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
        for balancer in ("headtail", "none"):
            for heads, kv_heads in ((4, 4), (4, 2), (4, 1)):
                _check_attention(mesh, balancer, heads, kv_heads)
            _check_llama(mesh, balancer)
        _check_saved_activations(mesh)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_cp_attention_and_model_match_one_process(tmp_path, world):
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.start_processes(_worker, args=(world, str(tmp_path)), nprocs=world, start_method="fork")
