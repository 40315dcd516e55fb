"""Server processes started, waited for until they answer, and stopped (``ServerProcess``), and the vLLM
OpenAI-compatible server among them (``VLLMServer``, ``vllm.entrypoints.openai.api_server``). The judge the job
serves itself runs one (``reward.judge_server``); so do the tests and the benchmarks, which also start
``vrag_rl.serve`` this way.

The process gets ``PR_SET_PDEATHSIG`` from a small interpreter that then execs the server (a ``preexec_fn`` is
not safe in a process with threads, such as a Ray actor): it dies with whoever started it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

# Runs the command with PR_SET_PDEATHSIG set, which execve keeps.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server command started (dying with its parent), waited for until ``url + ready_path`` answers 200, stopped.

    ``stop`` sends SIGTERM and waits (SIGKILL after a minute); ``proc.returncode`` then says how it ended."""

    def __init__(
        self,
        cmd: Sequence[str],
        url: str,
        log_file: str | Path,
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        ready_path: str = "/health",
        start_timeout_s: float = 300.0,
        name: str = "the server",
    ) -> None:
        self.url, self.name = url, name
        self.log_file = Path(log_file)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _DIE_WITH_PARENT, *cmd], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd
            )
        self._wait(ready_path, start_timeout_s)

    def _wait(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} did not answer {path} within {timeout_s:.0f} s:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}{path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def log_tail(self) -> str:
        return f"({self.log_file}) " + self.log_file.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class VLLMServer(ServerProcess):
    """Serves ``model_dir`` as ``served_name``; ``base_url`` once healthy (the constructor waits); ``stop``.

    ``on_cpu``: no graph capture, a 1 GiB KV cache and the engine in the server's own process (starts in
    seconds rather than tens). ``api_key``: every ``/v1`` request must carry it as a Bearer token; it reaches the
    server through its environment (``VLLM_API_KEY``, which vLLM keeps out of its cache files), never its command
    line, and a server that answers ``/v1/models`` without it is stopped and refused."""

    def __init__(
        self,
        model_dir: str | Path,
        served_name: str,
        log_file: str | Path,
        *,
        host: str = "127.0.0.1",
        max_model_len: int = 4096,
        dtype: str = "float32",
        on_cpu: bool = True,
        extra_args: Sequence[str] = (),
        start_timeout_s: float = 300.0,
        api_key: str | None = None,
    ) -> None:
        port = free_port(host)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
        cmd += ["--served-model-name", served_name, "--host", host, "--port", str(port)]
        cmd += ["--max-model-len", str(max_model_len), "--dtype", dtype, *extra_args]
        env = dict(os.environ)
        env.pop("VLLM_API_KEY", None)  # only the key given here, if any
        if api_key:
            env["VLLM_API_KEY"] = api_key
        if on_cpu:
            cmd.append("--enforce-eager")
            env |= {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        url = f"http://{host}:{port}"
        super().__init__(cmd, url, log_file, env=env, start_timeout_s=start_timeout_s, name="the vLLM server")
        if api_key:
            self._check_key_required()

    def _check_key_required(self) -> None:
        status = httpx.get(f"{self.base_url()}/models", timeout=30).status_code
        if status != 401:
            self.stop()
            raise RuntimeError(f"{self.name} at {self.url} answered {status}, not 401, to a request without its key")

    def base_url(self) -> str:
        return f"{self.url}/v1"
