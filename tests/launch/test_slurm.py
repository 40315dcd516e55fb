"""``launch/slurm.sbatch`` on a real single-node Slurm (munge, slurmctld and slurmd started here, as root).

The job starts a Ray head, waits for its node, and runs a one-step main job on that cluster from the warm
policy; the test polls ``squeue`` until the job is gone, then checks the job's log and the run directory.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM_CONF = """\
ClusterName=vrag
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _free_mb() -> int:
    return int(
        subprocess.run(["free", "-m"], capture_output=True, text=True, check=True).stdout.split("\n")[1].split()[1]
    )


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment of a running single-node Slurm; its daemons are stopped afterwards."""
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(d=d, cpus=os.cpu_count(), mem=_free_mb() - 1024))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    run = Path("/run/munge")
    run.mkdir(exist_ok=True)
    shutil.chown(run, "munge", "munge")
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode:  # munge may serve already
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    subprocess.run(["slurmctld", "-c", "-i"], env=env, check=True)
    subprocess.run(["slurmd", "-N", "localhost"], env=env, check=True)
    deadline = time.monotonic() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, (d / "slurmctld.log").read_text()[-3000:]
        time.sleep(1)
    yield env
    for daemon in ("slurmd", "slurmctld"):
        pid = d / f"{daemon}.pid"
        if pid.exists():
            subprocess.run(["kill", pid.read_text().strip()], check=False)


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
    deadline = time.monotonic() + 900
    while subprocess.run(["squeue", "-h", "-j", job], env=slurm, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} still queued or running after 15 minutes"
        time.sleep(3)
    text = log.read_text()
    assert "1 node(s) in the Ray cluster" in text, text[-3000:]
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1, text[-3000:]
    assert (tmp_path / "run" / "export" / "model.safetensors").exists()
    # The job's Ray is gone with the job: nothing of its session directory is left.
    assert not Path(f"/tmp/vrag-rl-ray-{job}").exists()
