"""A judge the job serves itself: a local checkpoint behind vLLM's OpenAI-compatible server, in a Ray actor.

With ``judge.model_dir`` set, the main job starts ``JudgeServer`` as a Ray actor (``serve_num_gpus`` GPUs on
clusters; Ray gives the server process those devices), waits until the server answers ``/health``, points the
reward actor's judge client at it (``constrain_verdict`` makes a small judge's replies parseable) and stops it
at the end. The server process dies with its actor (``PR_SET_PDEATHSIG``), so a killed job leaves no server
behind. The judge code is the same as for any endpoint: only where the endpoint comes from differs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from vrag_rl.reward.judge import JudgeConfig

SERVED_NAME = "judge"
NODE_ADDRESS = "node"  # host: the address of the node the server runs on


# Runs the command with PR_SET_PDEATHSIG set, which execve keeps: set in a fresh interpreter rather than in a
# preexec_fn, which is not safe in a process with threads (a Ray actor has several).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class JudgeServer:
    """Starts the server on construction; ``base_url`` once it is healthy; ``stop`` ends it."""

    def __init__(self, cfg: JudgeConfig, log_file: str, host: str = "127.0.0.1") -> None:
        if host == NODE_ADDRESS:
            import ray

            host = ray.util.get_node_ip_address()
        port = _free_port(host)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(cfg.model_dir)]
        cmd += ["--served-model-name", SERVED_NAME, "--host", host, "--port", str(port)]
        cmd += ["--max-model-len", str(cfg.serve_max_model_len), "--dtype", cfg.serve_dtype]
        env = dict(os.environ)
        if cfg.serve_num_gpus == 0:  # CPU: no graph capture, a small KV cache, the engine in the server's process
            cmd.append("--enforce-eager")
            env |= {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        self.log_file = Path(log_file)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _DIE_WITH_PARENT, *cmd], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.url = f"http://{host}:{port}"
        self._wait(cfg.serve_start_timeout_s)

    def _wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the judge server exited ({self.proc.returncode}); see {self.log_file}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the judge server was not healthy within {timeout_s:.0f} s; see {self.log_file}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)

    def base_url(self) -> str:
        return f"{self.url}/v1"

    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_judge_server(cfg: JudgeConfig, log_file: Path):
    """The server as a Ray actor on a node with ``serve_num_gpus`` GPUs, and the judge config that uses it."""
    import ray

    # The server process is not Ray's to count: the actor only holds its GPUs.
    remote = ray.remote(JudgeServer).options(num_cpus=0.1, num_gpus=cfg.serve_num_gpus)
    # On one machine the server listens on loopback only; across nodes, on its node's address.
    host = "127.0.0.1" if len([n for n in ray.nodes() if n["Alive"]]) == 1 else NODE_ADDRESS
    actor = remote.remote(cfg, str(log_file), host)
    url = ray.get(actor.base_url.remote(), timeout=cfg.serve_start_timeout_s + 60)
    return actor, JudgeConfig(**{**cfg.__dict__, "base_url": url, "model": SERVED_NAME})
