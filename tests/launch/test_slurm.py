"""``launch/slurm.sbatch`` on a real single-node Slurm (munge, slurmctld and slurmd started here, as root).

The job starts a Ray head, waits for its node, and runs a one-step main job on that cluster from the warm
policy; the test polls ``squeue`` until the job is gone, then checks the job's log and the run directory.
"""

import os
import subprocess
from pathlib import Path

import pytest
from slurm_cluster import Node, free_mb, start_slurm, stop_slurm, wait_for_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment of a running single-node Slurm; its daemons are stopped afterwards."""
    d = tmp_path_factory.mktemp("slurm")
    try:
        yield start_slurm(d, [Node("localhost", "127.0.0.1")], os.cpu_count(), free_mb() - 1024)
    finally:
        stop_slurm(d)


def test_sbatch_runs_the_main_job_on_a_ray_cluster(slurm, tmp_path, warm_policy, tiny_dirs):
    log = tmp_path / "job.out"
    job = (
        subprocess.run(
            [
                "sbatch",
                "--parsable",
                f"--chdir={ROOT}",
                f"--output={log}",
                f"--cpus-per-task={os.cpu_count()}",
                "launch/slurm.sbatch",
                "+recipe=tiny_cpu",
                "sft.steps=0",
                "run.steps=1",
                "run.val_every=0",
                "algo.prompts_per_step=2",
                "algo.group_size=2",
                "sampling.max_tokens=64",
                f"models.policy={warm_policy}",
                f"models.tiny_dir={tiny_dirs['policy'].parent}",
                f"hydra.run.dir={tmp_path / 'run'}",
            ],
            env=slurm,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .split(";")[0]
    )
    wait_for_job(Node("localhost", "127.0.0.1"), slurm, job, 900)
    text = log.read_text()
    assert "1 node(s) in the Ray cluster" in text, text[-3000:]
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1, text[-3000:]
    assert (tmp_path / "run" / "export" / "model.safetensors").exists()
    # The job's Ray is gone with the job: nothing of its session directory is left.
    assert not Path(f"/tmp/vrag-rl-ray-{job}").exists()
