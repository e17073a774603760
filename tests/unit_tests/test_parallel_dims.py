"""Single-process checks of ParallelDims, layout validation, the llama TP plan, AC and gradient clipping."""

import copy
import random

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel
from torch.utils._python_dispatch import TorchDispatchMode

from torchtitan.config import ConfigError, JobConfig
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.parallel_dims import ParallelDims, validate_model
from torchtitan.distributed.tensor_parallel import ReplicateParallel, check_async_tp
from torchtitan.distributed.utils import (
    clip_grad_norm_,
    dist_max,
    dist_mean,
    dist_sum,
    init_distributed,
    set_determinism,
)
from torchtitan.models.llama3.infra.parallelize import check_supported, llama_tp_plan, parallelize_llama
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.llama3.model.model import Transformer
from torchtitan.protocols.model_converter import build_model_converters


def dims(world_size: int, **degrees: int) -> ParallelDims:
    base = dict(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=1, etp=1)
    return ParallelDims(**{**base, **degrees}, world_size=world_size)


def tiny_args() -> TransformerModelArgs:
    return TransformerModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=16
    )


def job(**parallelism: object) -> JobConfig:
    jc = JobConfig()
    for key, value in parallelism.items():
        setattr(jc.parallelism, key, value)
    jc.training.seq_len = 16
    return jc


def test_single_process_needs_no_process_group() -> None:
    d = dims(1)
    assert d.dp_shard == 1 and d.dp_world_size == 1 and d.non_data_parallel_size == 1
    assert not (d.dp_enabled or d.fsdp_enabled or d.tp_enabled or d.pp_enabled or d.cp_enabled)
    assert not d.loss_parallel_enabled and d.seq_len_divisor == 1
    assert d.world_mesh is None and d.get_mesh("dp") is None and d.get_mesh("tp") is None
    assert d.dp_rank() == 0 and not dist.is_initialized()


def test_init_distributed_without_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    device = init_distributed(JobConfig().comm)
    assert device.type in ("cpu", "cuda") and not dist.is_initialized()


def test_remaining_ranks_go_to_dp_shard() -> None:
    d = dims(16, dp_replicate=2, tp=2)
    assert d.dp_shard == 4 and d.dp_world_size == 8 and d.non_data_parallel_size == 2
    assert d.fsdp_enabled and d.dp_enabled and d.tp_enabled and d.loss_parallel_enabled
    assert d.seq_len_divisor == 2  # sequence parallel shards the sequence over TP
    assert dims(8, tp=2, cp=2).seq_len_divisor == 8  # CP load balancing needs 2 chunks per CP rank
    no_sp = ParallelDims(1, 2, 1, 2, 1, 1, 1, 4, enable_loss_parallel=False, enable_sequence_parallel=False)
    assert no_sp.seq_len_divisor == 1 and not no_sp.loss_parallel_enabled and not no_sp.sequence_parallel_enabled


@pytest.mark.parametrize(
    "world_size,degrees,message",
    [
        (4, dict(dp_shard=2, tp=3),
         "parallelism degrees multiply to 6 (data_parallel_replicate_degree=1 * context_parallel_degree=1 * "
         "tensor_parallel_degree=3 * pipeline_parallel_degree=1 * data_parallel_shard_degree=2) but the world "
         "size is 4; make the product equal 4 (--parallelism.data_parallel_shard_degree=-1 takes the remaining ranks)"),
        (6, dict(tp=4),
         "world size 6 is not divisible by data_parallel_replicate_degree=1 * context_parallel_degree=1 * "
         "tensor_parallel_degree=4 * pipeline_parallel_degree=1 = 4; choose degrees whose product divides 6"),
        (4, dict(tp=0), "--parallelism.tensor_parallel_degree=0 is invalid; set it to an integer >= 1"),
        (4, dict(dp_shard=-2),
         "--parallelism.data_parallel_shard_degree=-2 is invalid; "
         "set it to an integer >= 1 or -1 (use the remaining ranks)"),
        (4, dict(tp=2, etp=4),
         "--parallelism.expert_tensor_parallel_degree=4 must be 1 or equal --parallelism.tensor_parallel_degree=2"),
    ],
)
def test_invalid_degrees(world_size: int, degrees: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        dims(world_size, **degrees)
    assert str(e.value) == message


def test_from_job_config_reads_the_parallelism_flags() -> None:
    jc = job(data_parallel_replicate_degree=2, tensor_parallel_degree=2, disable_loss_parallel=True)
    d = ParallelDims.from_job_config(jc, 8)
    assert (d.dp_replicate, d.dp_shard, d.tp) == (2, 2, 2)
    assert d.tp_enabled and not d.loss_parallel_enabled and d.sequence_parallel_enabled
    jc.parallelism.disable_sequence_parallel = True
    assert not ParallelDims.from_job_config(jc, 8).sequence_parallel_enabled


def test_validate_model_against_heads_seq_len_and_batch() -> None:
    with pytest.raises(ConfigError, match=r"^--parallelism.tensor_parallel_degree=4 must divide .* n_kv_heads=2"):
        validate_model(dims(4, tp=4), tiny_args(), job())
    jc = job()
    jc.training.seq_len = 15
    with pytest.raises(ConfigError, match=r"^--training.seq_len=15 must be divisible by 2 \(tensor_parallel_degree=2 "
                                          r"\(sequence parallel\)\); use e.g. --training.seq_len=16$"):
        validate_model(dims(2, tp=2), tiny_args(), jc)
    jc = job()
    jc.training.local_batch_size, jc.training.global_batch_size = 2, 6
    with pytest.raises(ConfigError, match=r"^training.global_batch_size = 6 is invalid; fix: use -1 or a positive multiple of "
                       r"training.local_batch_size \(2\) x the data-parallel degree \(2\) = 4$"):
        validate_model(dims(2), tiny_args(), jc)
    validate_model(dims(4, tp=2), tiny_args(), job())


def test_ddp_with_tp_and_offload_without_fsdp_are_rejected() -> None:
    with pytest.raises(ConfigError, match="needs data_parallel_shard_degree > 1 \\(HSDP\\); DDP only runs alone$"):
        check_supported(dims(4, dp_replicate=2, dp_shard=1, tp=2), job())
    jc = job()
    jc.training.enable_cpu_offload = True
    with pytest.raises(ConfigError, match="^--training.enable_cpu_offload needs FSDP"):
        check_supported(dims(1), jc)


def test_async_tp_gate_names_the_missing_requirement() -> None:
    jc = job(enable_async_tensor_parallel=True)
    with pytest.raises(ConfigError) as e:
        check_async_tp(jc, "cpu")
    assert str(e.value) == (
        "--parallelism.enable_async_tensor_parallel needs a CUDA device (symmetric memory), but this run is on CPU "
        "and --compile.enable with 'model' in --compile.components; drop the flag or provide them"
    )
    jc.compile.enable = True
    with pytest.raises(ConfigError, match="needs a CUDA device .* on CPU; drop"):
        check_async_tp(jc, "cpu")
    jc.compile.enable = False
    with pytest.raises(ConfigError, match="needs --compile.enable with 'model'"):
        check_async_tp(jc, "cuda")
    jc.compile.enable = True
    check_async_tp(jc, "cuda")


def test_tp_plan_styles() -> None:
    plan = llama_tp_plan(sequence_parallel=True, loss_parallel=True)
    assert isinstance(plan["layers.*.attention.wq"], ColwiseParallel)
    assert isinstance(plan["layers.*.attention.wo"], RowwiseParallel)
    assert isinstance(plan["layers.*.feed_forward.w2"], RowwiseParallel)
    assert isinstance(plan["layers.*.attention_norm"], SequenceParallel)
    assert isinstance(plan["layers.*.attention"], PrepareModuleInput)
    assert not plan["output"].use_local_output  # logits stay vocab-sharded for loss_parallel
    no_sp = llama_tp_plan(sequence_parallel=False, loss_parallel=False)
    assert isinstance(no_sp["norm"], ReplicateParallel) and "layers.*.attention" not in no_sp
    assert no_sp["output"].use_local_output


def _grads_after_step(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    model(tokens).float().pow(2).mean().backward()
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += func is torch.ops.aten.mm.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "mode,option,float8",
    [("full", "2", False), ("selective", "1", False), ("selective", "2", False), ("selective", "op", False),
     ("full", "2", True), ("selective", "op", True)],
)
def test_activation_checkpointing_keeps_gradients_and_recomputes_as_configured(
    mode: str, option: str, float8: bool
) -> None:
    torch.manual_seed(0)
    plain = Transformer(tiny_args())
    tokens = torch.randint(0, 128, (2, 16))
    jc = job()
    if float8:
        # A dispatch mode (this counter, op-level SAC's policy, eager or compiled) sees a float8 matmul as
        # `mm` on torchao's Float8TrainingTensors; the subclass calls `_scaled_mm` below it.
        jc.model.converters = ["quantize.linear.float8"]
        build_model_converters(jc).convert(plain)
    jc.activation_checkpoint.mode, jc.activation_checkpoint.selective_ac_option = mode, option
    wrapped = parallelize_llama(copy.deepcopy(plain), dims(1), jc)
    counts = []
    for model in (plain, wrapped):
        loss = model(tokens).float().pow(2).mean()
        with _CountMatmuls() as counter:
            loss.backward()
        counts.append(counter.count)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), wrapped.parameters()))
    # A checkpointed block recomputes 6 of its 7 forward matmuls (recomputation stops before w2, whose
    # output backward does not need); with float8 all 7, since torchao's autograd function saves w2's
    # inputs only after its matmul ran. Op-level SAC saves every matmul output and recomputes none.
    wrapped_blocks = {("full", "2"): 2, ("selective", "1"): 2, ("selective", "2"): 1, ("selective", "op"): 0}
    assert counts[1] - counts[0] == (7 if float8 else 6) * wrapped_blocks[(mode, option)]
    n_wrappers = sum(type(b).__name__ == "CheckpointWrapper" for b in wrapped.layers.values())
    assert n_wrappers == (2 if option == "op" else wrapped_blocks[(mode, option)])


@pytest.mark.parametrize("option", ["x", "0", "-1"])
def test_bad_selective_option(option: str) -> None:
    jc = job()
    jc.activation_checkpoint.mode, jc.activation_checkpoint.selective_ac_option = "selective", option
    with pytest.raises(ConfigError, match=f"^--activation_checkpoint.selective_ac_option='{option}' is invalid; "
                                          "use a positive integer N"):
        apply_ac(Transformer(tiny_args()), jc.activation_checkpoint)


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clip_grad_norm_matches_torch(norm_type: float) -> None:
    torch.manual_seed(0)
    a = Transformer(tiny_args())
    b = copy.deepcopy(a)
    tokens = torch.randint(0, 128, (2, 16))
    for m in (a, b):
        m(tokens).float().pow(2).mean().backward()
    expected = torch.nn.utils.clip_grad_norm_(a.parameters(), 1e-3, norm_type=norm_type)
    got = clip_grad_norm_(b.parameters(), 1e-3, norm_type=norm_type)
    assert torch.allclose(got, expected, rtol=1e-6) and got > 1e-3
    assert all(torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-9) for p, q in zip(a.parameters(), b.parameters()))


def test_clip_grad_norm_clips_uncounted_copies_but_counts_them_once() -> None:
    """A tied weight's second copy (a later pipeline stage's): clipped like the first, not in the norm."""
    torch.manual_seed(0)
    tied, other = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    copy_ = torch.nn.Parameter(tied.detach().clone())
    tied.grad, other.grad = torch.randn(4, 3), torch.randn(5)
    copy_.grad = tied.grad.clone()
    expected = torch.linalg.vector_norm(torch.cat([tied.grad.flatten(), other.grad]))
    got = clip_grad_norm_([tied, other, copy_], 1e-3, uncounted=[copy_])
    assert torch.allclose(got, expected, rtol=1e-6) and got > 1e-3
    clipped = torch.linalg.vector_norm(torch.cat([tied.grad.flatten(), other.grad]))
    assert torch.equal(copy_.grad, tied.grad) and torch.allclose(clipped, torch.tensor(1e-3), rtol=1e-4)


def test_reductions_without_a_mesh_return_the_value() -> None:
    assert dist_sum(torch.tensor(2.5)) == 2.5 and dist_max(3) == 3.0 and dist_mean(torch.tensor([4.0])) == 4.0


def test_set_determinism_seeds_every_rng_and_switches_algorithms() -> None:
    debug = JobConfig().debug
    debug.seed, debug.deterministic = 42, True
    try:
        draws = []
        for _ in range(2):
            assert set_determinism(dims(1), torch.device("cpu"), debug) == 42
            draws.append((torch.rand(3).tolist(), random.random()))
        assert draws[0] == draws[1] and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    debug.seed = None
    assert set_determinism(dims(1), torch.device("cpu"), debug) != set_determinism(dims(1), torch.device("cpu"), debug)
