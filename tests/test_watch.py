"""The watch command, as the README runs it: its own interpreter, the vLLM engine, the warm policy, greedy."""

import json
import os
import subprocess
import sys

from tests.conftest import CACHE


def test_watch_writes_readable_transcripts(tmp_path, warm_policy, tiny_dirs):
    out = tmp_path / "watch"
    env = {**os.environ, "VRAG_RL_CACHE": str(CACHE)}
    proc = subprocess.run(
        [sys.executable, "-m", "vrag_rl.watch", "--questions", "3", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(records) == 3
    kinds = [t["action"] for r in records for t in r["turns"]]
    assert "search" in kinds and "answer" in kinds, kinds
    for r in records:
        assert all((out / name).is_file() for name in r["images"])
        assert len(r["images"]) == len(r["retrieved_pages"]) + len(r["crops"])
        assert set(r["reward"]) == {"total", "ndcg", "answer", "format"}
    page = (out / "index.html").read_text()
    assert all(r["qid"] in page for r in records) and page.count("<img") >= sum(len(r["images"]) for r in records)
    assert f"transcripts: {out / 'index.html'}" in proc.stdout
