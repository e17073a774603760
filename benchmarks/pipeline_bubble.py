"""Pipeline bubble at PP 2 on CPU: step time of GPipe, 1F1B, Interleaved1F1B and ZBVZeroBubble against the
compute time of the same stages run back to back without a pipeline, for 4 and 8 microbatches.

    python benchmarks/pipeline_bubble.py [--steps 5] [--seq-len 256] [--microbatches 4 8]

Each configuration spawns 2 fresh gloo processes (one thread each) running the debug Llama split by
`torchtitan.distributed.pipeline_parallel`. "compute" is, per rank, the time of the forward + backward
of its stages over all microbatches with no communication (the slower rank counts); the measured
bubble is 1 - compute / step, printed next to the theoretical (p - 1) / (m + p - 1). Peak memory is
each rank's max RSS.
"""

import argparse
import dataclasses
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchtitan.components.loss import TokenNormalizedLoss, cross_entropy_loss
from torchtitan.distributed import pipeline_parallel as ppl
from torchtitan.models.llama3 import Transformer, llama3_args

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble")
PP = 2
VOCAB = 2048  # the shipped tokenizer's size order; the debug flavor leaves it to the tokenizer


def _stages(schedule: str, rank: int, seq_len: int):
    cls = ppl.schedule_class(schedule)
    n_stages = PP * (1 if ppl.is_single_stage(cls) else 2)
    args = dataclasses.replace(llama3_args["debugmodel"], vocab_size=VOCAB, max_seq_len=seq_len)
    with torch.device("meta"):
        model = Transformer(args)
    fqns = ppl.fqns_per_stage(n_stages, args.n_layers, 1, 1, ("tok_embeddings",), ("norm", "output"))
    ids = ppl.stage_ids_this_rank(rank, PP, n_stages, issubclass(cls, ppl.V_SCHEDULES))
    parts = []
    for sid in ids:
        torch.manual_seed(sid)
        part = ppl.split_module(model, fqns[sid])
        part.to_empty(device="cpu")
        with torch.no_grad():
            part.init_weights()
        parts.append(part)
    return cls, ids, n_stages, parts, args


def _compute_time(parts, ids, n_stages, m, seq_len, dim, vocab) -> float:
    """Forward + backward of this rank's stages over m microbatches, no communication."""
    tokens = torch.randint(0, vocab, (1, seq_len))
    start = time.perf_counter()
    for _ in range(m):
        for part, sid in zip(parts, ids):
            x = tokens if sid == 0 else torch.randn(1, seq_len, dim, requires_grad=True)
            out = part(x)
            if sid == n_stages - 1:
                cross_entropy_loss(out, tokens).backward()
            else:
                out.backward(torch.randn_like(out))
    return time.perf_counter() - start


def _worker(rank: int, schedule: str, m: int, steps: int, seq_len: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=PP)
    cls, ids, n_stages, parts, args = _stages(schedule, rank, seq_len)
    loss = TokenNormalizedLoss(cross_entropy_loss)
    loss.global_tokens = m * seq_len
    stages = [ppl.PipelineStage(p, s, n_stages, torch.device("cpu"), group=dist.group.WORLD)
              for p, s in zip(parts, ids)]
    pc = argparse.Namespace(pipeline_parallel_schedule=schedule, pipeline_parallel_schedule_csv="")
    sched = ppl.build_schedule(pc, stages, m, loss)
    tokens = torch.randint(0, args.vocab_size, (m, seq_len))
    times = []
    for i in range(steps + 2):  # 2 warm-up steps
        dist.barrier()
        start = time.perf_counter()
        if 0 in ids:
            sched.step(tokens, target=tokens if n_stages - 1 in ids else None)
        else:
            sched.step(target=tokens if n_stages - 1 in ids else None)
        if i >= 2:
            times.append(time.perf_counter() - start)
    _compute_time(parts, ids, n_stages, 1, seq_len, args.dim, args.vocab_size)  # warm-up
    compute = min(_compute_time(parts, ids, n_stages, m, seq_len, args.dim, args.vocab_size) for _ in range(3))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results[rank] = (sorted(times)[len(times) // 2], compute, rss)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    opts = parser.parse_args()
    print(f"PP {PP}, debug Llama, microbatch 1 x {opts.seq_len} tokens, fp32, 1 thread per rank; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'schedule':16} {'m':>2} {'step s':>7} {'compute s':>9} {'bubble':>7} {'theory':>7} {'peak MiB/rank':>15}")
    for m in opts.microbatches:
        for schedule in SCHEDULES:
            results = mp.Manager().dict()
            mp.spawn(_worker, args=(schedule, m, opts.steps, opts.seq_len, results), nprocs=PP)
            step = max(results[r][0] for r in range(PP))
            compute = max(results[r][1] for r in range(PP))
            rss = "/".join(f"{results[r][2]:.0f}" for r in range(PP))
            print(f"{schedule:16} {m:>2} {step:7.3f} {compute:9.3f} {1 - compute / step:7.1%} "
                  f"{(PP - 1) / (m + PP - 1):7.1%} {rss:>15}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
