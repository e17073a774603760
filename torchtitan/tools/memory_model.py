"""An analytic per-rank memory model of one Llama-style training step under a parallel layout.

Used by the estimator's breakdown table and by the layout planner (scripts/estimate/estimation.py); see
docs/memory_estimation.md for the formulas and their measured error. All sizes are bytes on one rank.

- parameters, gradients: fp32, sharded by TP (t), PP (the largest stage) and FSDP (dp_shard x cp);
- optimizer: AdamW's two fp32 states per parameter;
- activations: what autograd saves per token and layer (SDPA with a memory-efficient kernel, so no
  seq x seq term), divided by t (sequence parallel) and cp; full AC keeps each layer's input plus one layer
  being recomputed, selective AC every N-th layer does that for one layer in N, op-level SAC keeps the matmul
  outputs; under PP the first stage holds `pp` microbatches in flight (1F1B);
- logits: the output projection, its fp32 copy and its gradient on the last stage (vocab-sharded under TP);
- communication buffers: FSDP's all-gathered layer and the prefetched next one (parameter dtype) and one
  layer's unsharded fp32 gradients before the reduce-scatter.
The peak is parameters + optimizer + communication buffers + the larger of (activations + logits) and
gradients: activations are freed as the backward pass produces gradients.
"""

from dataclasses import dataclass
from typing import Any

GIB = 1024**3
FP32 = 4
# Elements saved per token by one Transformer block, in units of: dim (h), kv dim (k), FFN hidden dim (f).
# Without AC: block input, two norm outputs, q/k/v, attention output and its logsumexp, the residual,
# the FFN's w1/w3 outputs, silu(w1) and the w2 input (calibrated against a FakeTensorMode tally, see docs).
_SAVED_H, _SAVED_K, _SAVED_F = 8, 2, 4
# Op-level SAC keeps the matmul outputs (q/k/v, attention, wo, w1, w3, w2): the share of the above it keeps.
_OP_SAC_SHARE = 0.6


@dataclass(frozen=True)
class Layout:
    """A parallel layout of `world_size` ranks and an activation-checkpointing mode."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ac: str = "none"  # none | full | selective (every 2nd layer) | op

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp

    def flags(self) -> list[str]:
        """The run_train.sh overrides that select this layout."""
        ac = ["--activation_checkpoint.mode", self.ac if self.ac in ("none", "full") else "selective"]
        if self.ac in ("selective", "op"):
            ac += ["--activation_checkpoint.selective_ac_option", "2" if self.ac == "selective" else "op"]
        return [
            "--parallelism.data_parallel_replicate_degree", str(self.dp_replicate),
            "--parallelism.data_parallel_shard_degree", str(self.dp_shard),
            "--parallelism.tensor_parallel_degree", str(self.tp),
            "--parallelism.pipeline_parallel_degree", str(self.pp),
            "--parallelism.context_parallel_degree", str(self.cp),
            *ac,
        ]


@dataclass(frozen=True)
class Shape:
    """The model and batch shape the memory model needs (from a flavor's args and the job config)."""

    dim: int
    n_layers: int
    kv_dim: int
    ffn_dim: int
    vocab: int
    seq_len: int
    local_batch: int  # sequences per data-parallel rank and step
    param_bytes: int  # bytes per element of the compute dtype (mixed_precision_param)

    @classmethod
    def from_args(cls, args: Any, seq_len: int, local_batch: int, param_bytes: int) -> "Shape":
        return cls(args.dim, args.n_layers, args.kv_heads * args.head_dim, args.ffn_hidden_dim, args.vocab_size,
                   seq_len, local_batch, param_bytes)

    @property
    def layer_params(self) -> int:
        return 2 * self.dim * self.dim + 2 * self.dim * self.kv_dim + 3 * self.dim * self.ffn_dim + 2 * self.dim

    @property
    def params(self) -> int:
        return self.n_layers * self.layer_params + 2 * self.vocab * self.dim + self.dim


def breakdown(shape: Shape, layout: Layout, microbatch: int = 1) -> dict[str, float]:
    """Per-rank bytes of each category and the estimated `peak` (see the module docstring)."""
    t, pp, cp = layout.tp, layout.pp, layout.cp
    fsdp = layout.dp_shard * cp
    stage_layers = -(-shape.n_layers // pp)
    embed = shape.vocab * shape.dim * (1 if pp > 1 else 2)  # the first/last stage holds one of the two
    stage_params = (stage_layers * shape.layer_params + embed) / t
    params = stage_params / fsdp * FP32
    optimizer = 2 * params

    tokens = shape.local_batch * shape.seq_len / cp
    if pp > 1:  # 1F1B: the first stage holds `pp` microbatches in flight
        tokens = min(shape.local_batch, pp * microbatch) * shape.seq_len / cp
    per_layer = tokens * (_SAVED_H * shape.dim + _SAVED_K * shape.kv_dim + _SAVED_F * shape.ffn_dim) / t
    per_layer *= shape.param_bytes
    layer_input = tokens * shape.dim / t * shape.param_bytes
    if layout.ac == "full":
        acts = stage_layers * layer_input + per_layer
    elif layout.ac == "selective":
        checkpointed = stage_layers // 2
        acts = (stage_layers - checkpointed) * per_layer + checkpointed * layer_input + per_layer * (checkpointed > 0)
    elif layout.ac == "op":
        acts = stage_layers * per_layer * _OP_SAC_SHARE + per_layer
    else:
        acts = stage_layers * per_layer
    logits = shape.local_batch * shape.seq_len / cp * shape.vocab / t * (shape.param_bytes + 2 * FP32)
    comm = 0.0
    if fsdp > 1:
        gathered = max(shape.layer_params, embed / 2) / t
        comm = 2 * gathered * shape.param_bytes + gathered * FP32
    peak = params + optimizer + comm + max(acts + logits, params)
    return {"params": params, "grads": params, "optimizer": optimizer, "activations": acts, "logits": logits,
            "comm_buffers": comm, "peak": peak}


def comm_volume(shape: Shape, layout: Layout) -> float:
    """Bytes one rank sends per step (ring collectives, factor (n-1)/n): FSDP all-gathers (forward and
    backward) and reduce-scatters, HSDP/DDP all-reduce of the gradient shard, TP's sequence-parallel
    all-gather + reduce-scatter twice per block in each direction, CP's K/V all-gather, PP's activations."""
    t, pp, cp, fsdp, rep = layout.tp, layout.pp, layout.cp, layout.dp_shard * layout.cp, layout.dp_replicate
    ring = lambda n: (n - 1) / n  # noqa: E731
    stage = (-(-shape.n_layers // pp) * shape.layer_params + shape.vocab * shape.dim * (1 if pp > 1 else 2)) / t
    volume = 0.0
    volume += 2 * stage * shape.param_bytes * ring(fsdp) + stage * FP32 * ring(fsdp)  # all-gather x2, reduce-scatter
    volume += 2 * stage / fsdp * FP32 * ring(rep)  # all-reduce of the shard across replicas
    tokens = shape.local_batch * shape.seq_len / cp
    act = tokens * shape.dim * shape.param_bytes
    layers = -(-shape.n_layers // pp)
    volume += layers * 8 * act / t * ring(t) * (t > 1)  # 4 collectives forward, 4 backward, per block
    volume += layers * 2 * 2 * tokens * shape.kv_dim * shape.param_bytes / t * ring(cp) * cp  # K/V fwd + grads bwd
    volume += 2 * act / t * (pp > 1)  # send activations forward, gradients back
    return volume
