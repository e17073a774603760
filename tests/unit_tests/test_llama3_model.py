"""Llama 3 model: sizes, shapes, causality, initialization, RoPE, FLOPs and job-dependent args."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from torchtitan.config import ConfigError, JobConfig
from torchtitan.models.llama3 import RoPEScalingArgs, Transformer, TransformerModelArgs, llama3_args
from torchtitan.models.llama3.model.model import _scale_rope_freqs, precompute_freqs_cis


def tiny_args(**overrides) -> TransformerModelArgs:
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=32, max_seq_len=32)
    return TransformerModelArgs(**{**args, **overrides})


def build(args: TransformerModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    return model


@pytest.mark.parametrize(
    "flavor, nparams, ffn_hidden",
    [("8B", 8_030_261_248, 14336), ("70B", 70_553_706_496, 28672), ("405B", 405_853_388_800, 53248)],
)
def test_flavor_parameter_counts(flavor, nparams, ffn_hidden):
    args = llama3_args[flavor]
    assert args.ffn_hidden_dim == ffn_hidden
    assert (args.vocab_size, args.rope_theta, args.rope_scaling) == (128256, 500000, RoPEScalingArgs())
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == nparams


def test_debug_flavor_takes_vocab_from_tokenizer():
    args = copy.deepcopy(llama3_args["debugmodel"])
    assert (args.dim, args.n_layers, args.n_heads, args.rope_theta, args.rope_scaling) == (256, 6, 16, 500000, None)
    job = JobConfig()
    job.training.seq_len = 128
    args.update_from_config(job, SimpleNamespace(vocab_size=2256))
    assert (args.vocab_size, args.max_seq_len) == (2256, 128)


def test_update_from_config_errors_and_validation_seq_len():
    job = JobConfig()
    job.training.seq_len = 64
    with pytest.raises(ConfigError, match=r"model.flavor='debugmodel' takes its vocab_size from the tokenizer"):
        copy.deepcopy(llama3_args["debugmodel"]).update_from_config(job)
    job.model.flavor = "8B"
    with pytest.raises(ConfigError, match=r"tokenizer has 200000 tokens but model.flavor='8B' embeds only 128256"):
        copy.deepcopy(llama3_args["8B"]).update_from_config(job, SimpleNamespace(vocab_size=200000))
    with pytest.raises(ConfigError, match="n_heads % n_kv_heads == 0"):
        tiny_args(n_kv_heads=3).update_from_config(job)
    job.validation.enable, job.validation.seq_len = True, 96
    args = copy.deepcopy(llama3_args["8B"])
    args.update_from_config(job, SimpleNamespace(vocab_size=128000))
    assert (args.vocab_size, args.max_seq_len) == (128256, 96)


def test_forward_shape_and_state_dict_has_only_parameters():
    model = build(tiny_args())
    logits = model(torch.randint(0, 100, (3, 17)))
    assert logits.shape == (3, 17, 100) and logits.dtype == torch.float32
    names = set(model.state_dict())
    assert names == {n for n, _ in model.named_parameters()}
    assert "layers.1.attention.wk.weight" in names and model.layers["1"].attention.wk.weight.shape == (32, 64)


def test_causal_masking():
    model = build(tiny_args())
    tokens = torch.randint(0, 100, (2, 24))
    changed = tokens.clone()
    changed[:, 10] = (tokens[:, 10] + 1) % 100
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert (a[:, 10:] - b[:, 10:]).abs().amax(dim=-1).min() > 1e-4


def test_init_statistics():
    args = tiny_args(dim=256, n_layers=3, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=256)
    model = build(args)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(1.0, rel=0.02)
    # output: trunc normal cut at 3 std, whose std is 0.9866 of the untruncated one
    out_std = args.dim**-0.5
    assert model.output.weight.abs().max() <= 3 * out_std
    assert model.output.weight.std().item() == pytest.approx(0.9866 * out_std, rel=0.02)
    for layer_id, layer in model.layers.items():
        depth_std = 0.02 / math.sqrt(2 * (int(layer_id) + 1))
        attn, ffn = layer.attention, layer.feed_forward
        for w, std in [(attn.wq, 0.02), (attn.wk, 0.02), (attn.wv, 0.02), (ffn.w1, 0.02),
                       (attn.wo, depth_std), (ffn.w2, depth_std), (ffn.w3, depth_std)]:
            assert w.weight.std().item() == pytest.approx(std, rel=0.03)
            assert w.weight.mean().abs().item() < 0.1 * std
        for norm in (layer.attention_norm, layer.ffn_norm):
            assert torch.equal(norm.weight, torch.ones(args.dim))
    assert torch.equal(model.norm.weight, torch.ones(args.dim))


def test_init_is_seeded_and_rope_table_rebuilt():
    a, b = build(tiny_args(), seed=3), build(tiny_args(), seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(a.freqs_cis, precompute_freqs_cis(a.model_args))
    assert a.freqs_cis.shape == (32, 8, 2)


def test_llama31_frequency_scaling():
    scaling = RoPEScalingArgs()  # wavelengths < 2048 kept, > 8192 divided by 8, blended in between
    freqs = torch.tensor([2 * math.pi / 1000, 2 * math.pi / 4096, 2 * math.pi / 20000])
    smooth = (8192 / 4096 - 1) / (4 - 1)
    expected = torch.tensor([freqs[0], (1 - smooth) * freqs[1] / 8 + smooth * freqs[1], freqs[2] / 8])
    torch.testing.assert_close(_scale_rope_freqs(freqs, scaling), expected)


def test_rope_survives_dtype_casts():
    model = build(tiny_args(rope_scaling=RoPEScalingArgs()))
    tokens = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        ref = model(tokens)
        model.to(torch.float64)
        assert model.freqs_cis.dtype == torch.float64
        torch.testing.assert_close(model(tokens).float(), ref, rtol=1e-5, atol=1e-5)
        model.to(torch.bfloat16)
        torch.testing.assert_close(model(tokens).float(), ref, rtol=0.1, atol=0.1)


def test_pipeline_stages_pass_hidden_states():
    model = build(tiny_args(n_layers=4))
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    first.norm = first.output = None
    del first.layers["2"], first.layers["3"]
    last.tok_embeddings = None
    del last.layers["0"], last.layers["1"]
    tokens = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        hidden = first(tokens)
        assert hidden.shape == (2, 12, 64)
        torch.testing.assert_close(last(hidden), model(tokens), rtol=0, atol=0)
    last.init_weights()  # init tolerates the missing modules too


def test_nparams_and_flops_by_hand():
    args = tiny_args()
    with torch.device("meta"):
        model = Transformer(args)
    # ffn hidden: int(2 * 4 * 64 / 3) = 170 -> 192 (multiple of 32)
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 192 + 2 * 64
    nparams = 100 * 64 * 2 + 2 * per_layer + 64
    assert nparams == 111_424
    # 6 * non-embedding params + 12 * n_layers * n_heads * head_dim * seq_len
    assert args.get_nparams_and_flops(model, 16) == (nparams, 6 * (nparams - 6400) + 12 * 2 * 4 * 16 * 16)
    assert args.get_nparams_and_flops(model, 16)[1] == 654_720


@pytest.mark.parametrize("autocast", [False, True])
def test_cpu_bf16_attention_runs_in_fp32(autocast):
    """bf16 q/k/v (GQA) on a CPU: the output is bf16, computed by fp32 SDPA, gradients flow back in bf16."""
    from torchtitan.models.attention import ScaledDotProductAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, generator=g).bfloat16().requires_grad_() for h in (4, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = ScaledDotProductAttention()(q, k, v)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
    ).bfloat16()
    assert out.dtype is torch.bfloat16 and torch.equal(out, expected)
    out.float().sum().backward()
    assert q.grad.dtype is k.grad.dtype is torch.bfloat16
