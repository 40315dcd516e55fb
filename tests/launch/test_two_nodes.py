"""``launch/slurm.sbatch --nodes=2`` on two nodes made on this machine, and a node lost mid-run.

Each node is a network namespace with an address on a private subnet that exists only between the two (a veth
pair) and, for its daemons, its own host name: the controller and a slurmd on the first, a slurmd on the
second. The filesystem is shared, as a cluster's run directories, corpus and models are. Everything is torn
down afterwards, on failure too.
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import Node, free_mb, job_state, start_slurm, stop_slurm, wait_for_job

ROOT = Path(__file__).resolve().parents[2]
SLURM_DAEMONS = ("slurmctld", "slurmscriptd", "slurmd", "slurmstepd")


def netns_processes(netns: str) -> dict[int, str]:
    """pid -> command line of the processes in a network namespace (slurm's daemons left out)."""
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    found = {}
    for pid in map(int, pids):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:  # gone meanwhile
            continue
        if not cmd.split(" ")[0].endswith(SLURM_DAEMONS) and not cmd.startswith(": slurmscriptd"):
            found[pid] = cmd
    return found


def make_nodes(tag: str) -> list[Node]:
    nodes = [Node(f"node{i}", f"10.211.77.{i}", f"vrag{tag}n{i}") for i in (1, 2)]
    veth = [f"vr{tag}e{i}" for i in (1, 2)]
    subprocess.run(["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]], check=True)
    for node, end in zip(nodes, veth):
        subprocess.run(["ip", "netns", "add", node.netns], check=True)
        subprocess.run(["ip", "link", "set", end, "netns", node.netns], check=True)
        address = ["addr", "add", f"{node.addr}/24", "dev", end]
        for cmd in (address, ["link", "set", end, "up"], ["link", "set", "lo", "up"]):
            subprocess.run(["ip", "-n", node.netns, *cmd], check=True)
    return nodes


def remove_nodes(tag: str) -> None:
    for i in (1, 2):
        netns = f"vrag{tag}n{i}"
        for pid in netns_processes(netns) if Path(f"/run/netns/{netns}").exists() else {}:
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)  # its end of the veth pair goes with it
    subprocess.run(["ip", "link", "del", f"vr{tag}e1"], capture_output=True)  # made but never moved


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tag = str(os.getpid() % 100000)
    d = tmp_path_factory.mktemp("slurm2")
    try:
        nodes = make_nodes(tag)
        env = start_slurm(d, nodes, os.cpu_count(), free_mb() // 2 - 512)
        yield nodes, env
    finally:
        stop_slurm(d)
        time.sleep(1)
        remove_nodes(tag)


def submit(cluster, log: Path, run_dir: Path, warm_policy, tiny_dirs, *overrides: str) -> str:
    nodes, env = cluster
    cmd = [*nodes[0].run_as(), "sbatch", "--parsable", "--nodes=2", f"--cpus-per-task={os.cpu_count()}"]
    cmd += [f"--chdir={ROOT}", f"--output={log}", "launch/slurm.sbatch", "+recipe=tiny_cpu"]
    cmd += ["algo.prompts_per_step=2", "algo.group_size=2", "sampling.max_tokens=64", "run.val_every=0"]
    cmd += ["run.save_every=1", "trainer.spread=true", "rollout.spread=true", "rollout.num_workers=2"]
    cmd += [f"models.policy={warm_policy}", f"models.tiny_dir={tiny_dirs['policy'].parent}"]
    cmd += [f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]


def metrics_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def spread_over_both(text: str, what: str) -> list[str]:
    found = re.search(rf"{what} on \['([\d.]+)', '([\d.]+)'\]", text)
    assert found, f"no '{what} on [...]' line: " + text[-3000:]
    return sorted(found.groups())


def assert_no_ray_left(nodes: list[Node]) -> None:
    deadline = time.monotonic() + 60
    while left := {n.name: netns_processes(n.netns) for n in nodes if netns_processes(n.netns)}:
        assert time.monotonic() < deadline, f"processes left after the job: {left}"
        time.sleep(2)


def test_two_nodes_train_a_lost_node_stops_the_job_by_name_and_a_resubmission_resumes(
    cluster, tmp_path, warm_policy, tiny_dirs
):
    """A job on both nodes (its warm start, trainer ranks and rollout workers spread over them) loses node 2 after
    step 1: it fails naming the node, leaving no Ray process; the job submitted again resumes and completes."""
    nodes, env = cluster
    run_dir = tmp_path / "run"
    job = submit(cluster, tmp_path / "lost.out", run_dir, warm_policy, tiny_dirs, "sft.steps=2", "run.steps=3")
    deadline = time.monotonic() + 900
    while not (run_dir / "checkpoints" / "step-000001").is_dir():  # step 1 committed: step 2 is under way
        assert time.monotonic() < deadline, (tmp_path / "lost.out").read_text()[-3000:]
        time.sleep(1)
    ray_on_node2 = netns_processes(nodes[1].netns)
    assert any("raylet" in cmd for cmd in ray_on_node2.values()), ray_on_node2
    for pid in ray_on_node2:
        os.kill(pid, signal.SIGKILL)
    took = wait_for_job(nodes[0], env, job, 240)
    text = (tmp_path / "lost.out").read_text()
    assert re.search(r"lost 1 of 2 Ray node\(s\) mid-run: node2 \(10\.211\.77\.2\)", text), text[-3000:]
    assert "JobState=FAILED" in job_state(nodes[0], env, job) and took < 240
    assert_no_ray_left(nodes)
    assert 1 <= metrics_rows(run_dir) < 3
    newest = max(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))

    again = submit(cluster, tmp_path / "again.out", run_dir, warm_policy, tiny_dirs, "sft.steps=2", "run.steps=3")
    wait_for_job(nodes[0], env, again, 900)
    text = (tmp_path / "again.out").read_text()
    assert f"resumed from {newest}" in text, text[-3000:]
    assert "vrag-rl: 2 node(s) node1 node2" in text and "2 node(s) in the Ray cluster" in text, text[-3000:]
    addresses = sorted(n.addr for n in nodes)
    assert spread_over_both(text, "trainer ranks") == addresses  # the torch.distributed group spans both nodes
    assert spread_over_both(text, "rollout workers") == addresses
    assert metrics_rows(run_dir) == 3 and (run_dir / "sft" / "model.safetensors").exists()
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())][-1] == "step-000003"
    assert (run_dir / "export" / "model.safetensors").exists()
    assert "JobState=COMPLETED" in job_state(nodes[0], env, again)
    assert_no_ray_left(nodes)
    assert not Path(f"/tmp/vrag-rl-ray-{again}").exists()  # the job's Ray session directory went with it
