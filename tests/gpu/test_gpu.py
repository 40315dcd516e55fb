"""The GPU checks (``tests/gpu/checks.py``) under pytest. On the CPU they run as a dry run over gloo, so that the
code a GPU machine will run is exercised here; on CUDA they run for real. This is the one place in the suite where
a skip is right: without a GPU there is no GPU path to check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # runs tests/gpu/checks.py: vLLM and training in subprocesses

CHECKS = Path(__file__).with_name("checks.py")


def run_checks(*args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, str(CHECKS), *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_the_checks_run_on_the_cpu(warm_policy):
    results = {r["check"]: r for r in run_checks("--device", "cpu") if "check" in r}
    checks = {"fsdp2_bf16", "logprobs_vs_fp32", "maxsim", "faiss_gpu", "flash_attention", "offpolicy_step"}
    assert set(results) == checks
    assert all(r["ok"] is True for name, r in results.items() if name != "flash_attention")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_checks_pass_on_the_gpu():
    results = [r for r in run_checks() if "check" in r]
    assert results and all(r["ok"] in (True, "skipped") for r in results)
