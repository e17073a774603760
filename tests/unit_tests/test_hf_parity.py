"""Logit parity with Hugging Face transformers' LlamaForCausalLM in both conversion directions."""

import pytest
import torch

from torchtitan.models.llama3 import Llama3StateDictAdapter, RoPEScalingArgs, Transformer, TransformerModelArgs

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 128, 48
# (n_kv_heads, rope scaling): no GQA, GQA, GQA + Llama 3.1 scaling (real constants, and a small
# original context so the scaling moves frequencies that matter at this sequence length)
CASES = [
    (4, None),
    (2, None),
    (2, RoPEScalingArgs()),
    (1, RoPEScalingArgs(original_max_position_embeddings=16)),
]


def our_args(n_kv_heads: int, rope_scaling: RoPEScalingArgs | None) -> TransformerModelArgs:
    return TransformerModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=VOCAB, multiple_of=32,
        norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope_scaling, max_seq_len=SEQ,
    )


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def randomize_(model: torch.nn.Module) -> None:
    """Weights large enough that attention is far from uniform, norms away from one, so every
    weight and the RoPE angles visibly shape the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))


def build_ours(args: TransformerModelArgs) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    randomize_(model)
    return model


def assert_rel_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("n_kv_heads, rope_scaling", CASES)
def test_hf_to_ours(n_kv_heads, rope_scaling):
    torch.manual_seed(0)
    # an independently written HF config (not our hf_config) of the same model
    rope = None
    if rope_scaling is not None:
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": rope_scaling.original_max_position_embeddings}
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope,
        max_position_embeddings=SEQ, tie_word_embeddings=False, attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(config).float().eval()
    randomize_(hf)
    args = our_args(n_kv_heads, rope_scaling)
    ours = build_ours(args)
    ours.load_state_dict(Llama3StateDictAdapter(args, None).from_hf(hf.state_dict()), strict=True)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        logits = ours(tokens)
    assert_rel_close(logits, hf_logits(hf, tokens))


@pytest.mark.parametrize("n_kv_heads, rope_scaling", CASES)
def test_ours_to_hf(n_kv_heads, rope_scaling):
    torch.manual_seed(1)
    args = our_args(n_kv_heads, rope_scaling)
    ours = build_ours(args)
    adapter = Llama3StateDictAdapter(args, None)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**adapter.hf_config(), attn_implementation="sdpa"))
    hf.load_state_dict(adapter.to_hf(ours.state_dict()), strict=True)
    hf.float().eval()
    tokens = torch.randint(0, VOCAB, (3, SEQ))
    with torch.no_grad():
        logits = ours(tokens)
    assert_rel_close(logits, hf_logits(hf, tokens))


def test_scaling_matters_at_this_length():
    """Guard for the parity cases above: the small-context scaling really changes the logits."""
    torch.manual_seed(2)
    plain = build_ours(our_args(1, None))
    scaled = build_ours(our_args(1, CASES[-1][1]))
    scaled.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, VOCAB, (1, SEQ))
    with torch.no_grad():
        diff = (plain(tokens) - scaled(tokens)).abs().max() / plain(tokens).abs().max()
    assert diff > 0.05
