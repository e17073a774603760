"""The launch scripts: the SLURM script parses and launches our module; the fake-backend dry run."""

import re
import subprocess

from tests.integration_tests.runner import REPO, run_train


def test_slurm_script_parses_and_launches_trainer():
    script = REPO / "multinode_trainer.slurm"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert re.search(r"^#SBATCH --nodes=\d+", text, re.M)
    launch = " ".join(line.rstrip("\\").strip() for line in text.split("srun torchrun", 1)[1].splitlines()[:4])
    assert "-m torchtitan.train" in launch and "--job.config_file" in launch
    for flag in ("--nnodes", "--nproc_per_node", "--rdzv_id", "--rdzv_backend c10d", "--rdzv_endpoint"):
        assert flag in launch, flag


def test_run_train_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "run_train.sh")], check=True)


def test_fake_backend_dry_run_64_ranks(tmp_path):
    run = run_train(
        tmp_path, "--parallelism.data_parallel_shard_degree", "8", "--parallelism.tensor_parallel_degree", "8",
        ngpu=64, env={"COMM_MODE": "fake_backend"},
    )
    out = run.stdout + run.stderr
    assert "dp_shard=8" in out and "tp=8" in out, out[-3000:]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_fake_backend_rejects_bad_layout(tmp_path):
    run = run_train(
        tmp_path, "--parallelism.tensor_parallel_degree", "3", ngpu=64, env={"COMM_MODE": "fake_backend"},
        check=False,
    )
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tensor_parallel_degree" in errors[0], run.stderr[-3000:]
