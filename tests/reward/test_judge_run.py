"""The judge inside the main job: a dead judge stops the run, and a judge the job serves itself refuses requests
without the key the job made for it, scores every answer with it, leaves the key in no file the run writes, and is
gone when the job ends.

They run ``python -m vrag_rl.main`` (one short GRPO step from the warm policy) against a port nobody listens on, or
a vLLM server the job starts itself.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pytest

from tests.test_main import run_main

pytestmark = pytest.mark.slow  # runs the main job in subprocesses

SHORT = [
    "+recipe=tiny_cpu",
    "sft.steps=0",
    "algo.prompts_per_step=2",
    "algo.group_size=4",
    "run.steps=1",
    "run.val_every=0",
    "sampling.max_tokens=64",
    "reward.answer_metric=judge",
]


def judge(base_url: str, **settings) -> list[str]:
    """The overrides that give the run a judge (the section is empty unless chosen with +judge=endpoint)."""
    fields = {"base_url": base_url, "model": "judge", **settings}
    return ["+judge=endpoint", *(f"judge.{k}={v}" for k, v in fields.items())]


def test_a_dead_judge_stops_the_run_with_the_reason(closed_port_url, warm_policy, tiny_dirs, tmp_path):
    proc = run_main(
        *SHORT,
        *judge(closed_port_url, timeout_s=1.0, max_retries=0),
        f"models.policy={warm_policy}",
        f"models.tiny_dir={tiny_dirs['policy'].parent}",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode != 0
    assert "GRPO step 1: the judge at" in proc.stderr and "connection_error" in proc.stderr
    assert "judge.max_error_rate=0.5" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_an_unset_key_variable_stops_the_run_at_start(warm_policy, tmp_path):
    env_name = f"VRAG_UNSET_{uuid.uuid4().hex[:8]}"
    assert env_name not in os.environ
    proc = run_main(*SHORT, *judge("http://127.0.0.1:9/v1", api_key_env=env_name), f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and env_name in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def judge_servers() -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "vllm.entrypoints.openai.api_server" in cmd and "--served-model-name judge" in cmd:
            found.append(p)
    return found


def watch_the_judge(seen: dict, done: threading.Event) -> None:
    """While the job runs: the judge server's key (from its process's environment, where the job put it) and what
    the server answers without it, with a wrong one and with it."""
    import httpx
    import psutil

    while not done.is_set() and "answers" not in seen:
        for p in judge_servers():
            try:
                cmd, key = p.cmdline(), p.environ().get("VLLM_API_KEY")
            except psutil.Error:
                continue
            url = f"http://{cmd[cmd.index('--host') + 1]}:{cmd[cmd.index('--port') + 1]}/v1/models"
            try:
                answers = [
                    httpx.get(url, headers=h, timeout=10).status_code
                    for h in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {key}"})
                ]
            except httpx.HTTPError:  # not up yet
                continue
            seen.update(key=key, cmdline=" ".join(cmd), answers=answers)
        time.sleep(0.2)


def test_a_judge_the_job_serves_itself(warm_policy, tiny_dirs, tmp_path):
    """``+judge=local``: the tiny random policy as judge, behind a vLLM server in a Ray actor, with verdicts
    constrained to True or False, and an API key the job made: the server refuses requests without it (seen from
    here while the job runs), the job's answers are judged with it, and no file the run writes holds it."""
    seen, done = {}, threading.Event()
    watcher = threading.Thread(target=watch_the_judge, args=(seen, done), daemon=True)
    watcher.start()
    try:
        proc = run_main(
            *SHORT,
            "+judge=local",
            f"judge.model_dir={tiny_dirs['policy']}",
            "judge.serve_dtype=float32",
            f"models.policy={warm_policy}",
            f"models.tiny_dir={tiny_dirs['policy'].parent}",
            f"hydra.run.dir={tmp_path}",
        )
    finally:
        done.set()
        watcher.join(30)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Every answer got a verdict from a server that refuses requests without the key (seen below): the key worked.
    assert row["train/judge_error_rate"] == 0 and row["train/finish_rate"] > 0
    assert "Application startup complete" in (tmp_path / "judge_server.log").read_text()
    assert judge_servers() == []
    key = seen.get("key")
    assert key and len(key) >= 32 and seen["answers"] == [401, 401, 200], seen.get("answers")
    assert key not in seen["cmdline"]  # other users can read a process's command line
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(".hydra" in p.parts for p in files) and any("wandb" in p.parts for p in files)
    assert [p for p in files if key.encode() in p.read_bytes()] == []
    assert key not in proc.stdout + proc.stderr
