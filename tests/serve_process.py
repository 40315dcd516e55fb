"""A ``python -m vrag_rl.serve`` process on 127.0.0.1, started and waited for as users start it."""

import os
import sys
from pathlib import Path

from vrag_rl.vllm_server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
MAX_LIVE, MAX_WAITING = 4, 4  # the tests' server: small, so that the load test passes capacity with few clients


class ServeProcess(ServerProcess):
    """Waits for ``/ready`` (``ready``) or only ``/health`` (a server that is meant not to be ready)."""

    def __init__(self, args: list[str], log: Path, ready: bool = True, timeout_s: float = 300):
        port = free_port("127.0.0.1")
        cmd = [sys.executable, "-m", "vrag_rl.serve", "--port", str(port), *args]
        env = dict(os.environ, VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1")
        path = "/ready" if ready else "/health"
        super().__init__(
            cmd, f"http://127.0.0.1:{port}", log, env=env, cwd=ROOT, ready_path=path, start_timeout_s=timeout_s
        )


def serve_args(warm_policy, tiny_dirs, index) -> list[str]:
    return ["--policy", str(warm_policy), "--retriever-model", str(tiny_dirs["retriever"]), "--index", str(index)]
