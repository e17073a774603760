"""Context parallelism: per-rank peak memory and tokens/s of the debug Llama at long sequences, CP 1/2/4.

    OMP_NUM_THREADS=1 python benchmarks/context_parallel.py [--seqs 4096,8192,16384] [--cps 1,2,4] \
        [--steps 2] [--batch 1]

For each sequence length and CP degree, CP processes (gloo on CPU, NCCL on CUDA) each build the debug
Llama (fp32, replicated weights: no FSDP, so the difference between degrees is activations), install our
all-gather-KV CP attention (torch_ring is not measured), and run one warm-up and `--steps` timed
forward + backward passes on one `--batch` x seq batch, sharded with the headtail balancer. Per rank:
peak memory (CPU: peak RSS above the RSS before the first step; CUDA: the allocator's peak above the
memory allocated before it), the activations autograd saves for backward (distinct storages packed by
saved-tensor hooks in the warm-up pass, parameters excluded) and the tokens/s of the whole CP group. The
ratio columns are relative to CP 1 at the same length (about 1/CP is the goal).
"""

import argparse
import copy
import os
import resource
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from torchtitan.distributed.context_parallel import ContextParallel, apply_cp
from torchtitan.models.attention import ScaledDotProductAttention
from torchtitan.models.llama3 import Transformer, llama3_args
from torchtitan.tools.profiling import saved_activations

VOCAB = 2048


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank: int, cp: int, seq: int, batch: int, steps: int, tmp: str, results: dict) -> None:
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    args = copy.deepcopy(llama3_args["debugmodel"])
    args.vocab_size, args.max_seq_len = VOCAB, seq
    with torch.device(device):
        model = Transformer(args)
        model.init_weights()
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    context = None
    if cp > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=cp)
        context = ContextParallel(init_device_mesh(device.type, (cp,)), "headtail", "allgather_kv")
        apply_cp(model, context, ScaledDotProductAttention)
        (tokens,) = context.shard(tokens)

    def step() -> None:
        if context is None:
            model(tokens).float().logsumexp(-1).sum().backward()
        else:
            with context.rope_context([model], seq):
                model(tokens).float().logsumexp(-1).sum().backward()
        model.zero_grad(set_to_none=True)

    base = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    with saved_activations(model) as saved:
        step()  # warm-up (also reaches the peak)
    if cp > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results[rank] = (peak - base, sum(saved.values()), elapsed)
    if cp > 1:
        dist.destroy_process_group()


def measure(cp: int, seq: int, batch: int, steps: int) -> tuple[float, float, float]:
    """(max per-rank peak memory above the start, max per-rank saved activations, both in GiB; tokens/s of
    the CP group)."""
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(cp, seq, batch, steps, tmp, results), nprocs=cp, start_method="spawn")
        peak, saved = (max(r[i] for r in results.values()) / 2**30 for i in (0, 1))
        elapsed = max(r[2] for r in results.values())
    return peak, saved, steps * batch * seq / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="4096,8192,16384", help="sequence lengths, comma-separated")
    parser.add_argument("--cps", default="1,2,4", help="CP degrees, comma-separated")
    parser.add_argument("--steps", type=int, default=2, help="timed forward + backward passes")
    parser.add_argument("--batch", type=int, default=1)
    opts = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"load average before: {os.getloadavg()}")
    print("| seq | CP | peak memory per rank above start (GiB) | ratio | saved activations per rank (GiB) | ratio "
          "| tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for seq in (int(s) for s in opts.seqs.split(",")):
        base = None
        for cp in (int(c) for c in opts.cps.split(",")):
            peak, saved, tps = measure(cp, seq, opts.batch, opts.steps)
            base = base or (peak, saved)
            print(f"| {seq} | {cp} | {peak:.2f} | {peak / base[0]:.2f} | {saved:.2f} | {saved / base[1]:.2f} "
                  f"| {tps:.0f} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
