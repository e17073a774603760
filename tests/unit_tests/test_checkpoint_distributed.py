"""Two gloo ranks with FSDP2: load a one-process seed checkpoint, save (async) and export to HF under
FSDP, load that HF export under FSDP, resume on one process exactly, and raise the same ConfigError on
every rank for a tampered folder."""

import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from tests.unit_tests.test_checkpoint import Run, assert_same, cfg
from tests.unit_tests.test_checkpoint_hf import VOCAB, build_llama, llama_args
from torchtitan.config import ConfigError
from torchtitan.models.llama3 import Llama3StateDictAdapter

pytestmark = pytest.mark.slow
WORLD = 2


def llama_run(folder: str, seed: int, fsdp: bool, **kw) -> Run:
    args = llama_args()

    def model_fn() -> torch.nn.Module:
        model = build_llama(args)
        if fsdp:
            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in model.layers.values():
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    return Run(
        folder, cfg(**kw), seed=seed, model_fn=model_fn,
        batch_fn=lambda g: torch.randint(0, VOCAB, (2, 16), generator=g),
        sd_adapter=Llama3StateDictAdapter(args, None),
    )


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    try:
        run = llama_run(os.path.join(tmp, "run"), seed=5, fsdp=True, async_mode="async", last_save_in_hf=True)
        assert run.ckpt.load()  # the seed step-0, model only
        dump = {"loaded": full_weights(run.model)}
        run.train(2)  # saves step-2 in the background
        dump["step2"] = full_weights(run.model)
        run.train(1, last=3)  # Hugging Face export of step 3
        dump["step3"] = full_weights(run.model)
        run.ckpt.close()
        step3 = os.path.join(tmp, "run", "checkpoint", "step-3")
        from_hf = llama_run(os.path.join(tmp, "hf"), 7, fsdp=True, initial_load_in_hf=True, initial_load_path=step3)
        assert from_hf.ckpt.load()
        dump["from_hf"] = full_weights(from_hf.model)
        if rank == 0:
            torch.save(dump, os.path.join(tmp, "dump.pt"))
            bad = os.path.join(tmp, "tampered")
            shutil.copytree(os.path.join(tmp, "run", "checkpoint", "step-2"), bad)
            with open(os.path.join(bad, "__1_0.distcp"), "r+b") as f:
                f.seek(100)
                f.write(b"\0\1\2")
        dist.barrier()
        bad = os.path.join(tmp, "tampered")
        other = llama_run(os.path.join(tmp, "other"), seed=5, fsdp=True, initial_load_path=bad)
        try:
            other.ckpt.load()
        except ConfigError as e:
            open(os.path.join(tmp, f"error{rank}.txt"), "w").write(str(e))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp_save_and_load_across_layouts(tmp_path):
    seed = llama_run(str(tmp_path / "run"), seed=3, fsdp=False, create_seed_checkpoint=True)
    seed.ckpt.save(0)
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD)
    dump = torch.load(tmp_path / "dump.pt", weights_only=True)
    assert_same(dump["loaded"], seed.model.state_dict())

    one = llama_run(str(tmp_path / "run"), seed=6, fsdp=False, load_step=2)
    assert one.ckpt.load() and one.ts.step == 2 and one.loader.pos == 8
    assert_same(one.model.state_dict(), dump["step2"])
    one.train(1, save=False)  # resumed on one process, step 3 equals the FSDP run's step 3
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(v, dump["step3"][k], rtol=0, atol=1e-6)

    assert_same(dump["from_hf"], dump["step3"])
    hf = load_file(str(tmp_path / "run" / "checkpoint" / "step-3" / "model.safetensors"))
    assert_same(hf, Llama3StateDictAdapter(llama_args(), None).to_hf(dump["step3"]))

    errors = {(tmp_path / f"error{r}.txt").read_text() for r in range(WORLD)}
    assert errors == {
        f"checkpoint {tmp_path / 'tampered'} was tampered with: __1_0.distcp does not match its checksum in "
        ".checksums.json; the folder was modified after it was saved: restore it or load another step"
    }
