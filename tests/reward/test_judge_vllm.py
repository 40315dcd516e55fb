"""The judge against a real vLLM OpenAI-compatible server (``vllm.entrypoints.openai.api_server``) running the
tiny random policy on 127.0.0.1: unconstrained, a random model's replies are no verdict; with
``constrain_verdict`` every reply is True or False."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from vrag_rl.reward.judge import JudgeClient, JudgeConfig

ITEMS = [(f"What is item {i}?", f"answer {i}", f"it is answer {i}") for i in range(6)]


@pytest.fixture(scope="module")
def vllm_server(tiny_dirs, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_dirs["policy"])]
    cmd += ["--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048"]
    cmd += ["--enforce-eager", "--dtype", "float32"]
    proc = subprocess.Popen(
        cmd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "vLLM server exited:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM server not healthy in 300 s:\n" + log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        proc.wait(60)


def judge(base_url: str, constrain: bool) -> list:
    cfg = JudgeConfig(base_url=base_url, model="tiny", timeout_s=120, max_retries=0, constrain_verdict=constrain)
    with JudgeClient(cfg) as client:
        return client.judge_batch(ITEMS)


def test_a_constrained_verdict_is_always_true_or_false(vllm_server):
    free = judge(vllm_server, constrain=False)
    assert not all(r.status == "ok" for r in free), [r.detail for r in free]  # a random model writes no verdict
    constrained = judge(vllm_server, constrain=True)
    assert all(r.status == "ok" and r.correct in (True, False) for r in constrained), [r.detail for r in constrained]
