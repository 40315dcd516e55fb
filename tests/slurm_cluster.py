"""A real Slurm started by the tests, as root: munge, a slurmctld and a slurmd per node, and job helpers.

Each node is a network namespace made by the test. ``run_as(node)`` prefixes a command so that it runs on a node,
entering the node's network namespace (``nsenter --net``, which keeps /sys and the rest of the filesystem,
shared between the nodes as a cluster's shared filesystem would be). Daemons also get the node's host name
in a UTS namespace of their own.
"""

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CONF = """\
ClusterName=vrag
SlurmctldHost={controller}({controller_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
ReturnToService=2
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass(frozen=True)
class Node:
    name: str
    addr: str
    netns: str

    def run_as(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}"]

    def daemon(self, cmd: list[str]) -> list[str]:
        """``cmd`` started on this node under its host name (a UTS namespace of its own)."""
        return [*self.run_as(), "unshare", "--uts", "sh", "-c", f'hostname {self.name} && exec "$@"', "sh", *cmd]


def free_mb() -> int:
    out = subprocess.run(["free", "-m"], capture_output=True, text=True, check=True).stdout
    return int(out.split("\n")[1].split()[1])


def start_munge() -> None:
    run = Path("/run/munge")
    run.mkdir(exist_ok=True)
    shutil.chown(run, "munge", "munge")
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode:  # munge may serve already
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)


def start_slurm(d: Path, nodes: list[Node], cpus: int, mem_mb: int) -> dict[str, str]:
    """Write the config, start the daemons (controller on the first node) and wait until every node is idle.
    Returns the environment that Slurm's commands need."""
    for sub in ("state", "spool", *(f"spool/{n.name}" for n in nodes)):
        (d / sub).mkdir()
    lines = [f"NodeName={n.name} NodeAddr={n.addr} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN" for n in nodes]
    conf = CONF.format(
        d=d, controller=nodes[0].name, controller_addr=nodes[0].addr, nodes="\n".join(lines),
        names=",".join(n.name for n in nodes),
    )  # fmt: skip
    (d / "slurm.conf").write_text(conf)
    start_munge()
    full = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    subprocess.run(nodes[0].daemon(["slurmctld", "-c", "-i"]), env=full, check=True)
    for n in nodes:
        subprocess.run(n.daemon(["slurmd", "-N", n.name]), env=full, check=True)
    deadline = time.monotonic() + 60
    while True:
        states = subprocess.run(
            [*nodes[0].run_as(), "sinfo", "-h", "-N", "-o", "%T"], env=full, capture_output=True, text=True
        ).stdout.split()
        if states.count("idle") == len(nodes):
            return full
        assert time.monotonic() < deadline, f"nodes {states}: " + (d / "slurmctld.log").read_text()[-3000:]
        time.sleep(1)


def stop_slurm(d: Path) -> None:
    for pid in d.glob("*.pid"):
        subprocess.run(["kill", pid.read_text().strip()], check=False)


def wait_for_job(node: Node, env: dict[str, str], job: str, timeout_s: float) -> float:
    """Seconds until ``job`` left the queue; fails after ``timeout_s``."""
    start = time.monotonic()
    while subprocess.run([*node.run_as(), "squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout:
        assert time.monotonic() - start < timeout_s, f"job {job} still queued or running after {timeout_s:.0f} s"
        time.sleep(2)
    return time.monotonic() - start


def job_state(node: Node, env: dict[str, str], job: str) -> str:
    """``JobState=... ExitCode=...`` of a job that ended less than MinJobAge (300 s) ago."""
    out = subprocess.run([*node.run_as(), "scontrol", "show", "job", job], env=env, capture_output=True, text=True)
    return " ".join(w for w in out.stdout.split() if w.startswith(("JobState=", "ExitCode=")))
