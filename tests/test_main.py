"""The main job as users run it: a subprocess with Hydra overrides."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_main(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vrag_rl.main", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_main_job_runs_end_to_end(tmp_path, tiny_dirs):
    out = tmp_path / "run"
    proc = run_main(f"hydra.run.dir={out}", f"models.tiny_dir={tiny_dirs['policy'].parent}",
                    "demo.num_questions=3", "demo.steps=2", "demo.variants=[expert,wrong_answer,no_search]")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert metrics["trajectories"] == len(rows) == 9
    by_variant = metrics["reward_by_variant"]
    assert abs(by_variant["expert"] - 1.0) < 1e-9 and by_variant["no_search"] == 0.0
    assert 0.0 < by_variant["wrong_answer"] < 1.0
    # advantages are group-normalised: zero mean per question
    for qid in {r["qid"] for r in rows}:
        assert abs(sum(r["advantage"] for r in rows if r["qid"] == qid)) < 1e-5
    # the updates favour what the rewards favour
    assert metrics["logp_delta_positive_adv"] > metrics["logp_delta_negative_adv"]
    assert len(metrics["updates"]) == 2 and all(u["grad_norm"] > 0 for u in metrics["updates"])
    assert len(list(out.glob("*_shown_*.png"))) == 2
    assert "mean reward by variant" in proc.stdout


def test_bad_key_and_bad_value_fail_at_start_with_the_key_named(tmp_path):
    proc = run_main(f"hydra.run.dir={tmp_path}", "demo.no_such_key=1")
    assert proc.returncode != 0 and "no_such_key" in proc.stderr
    proc = run_main(f"hydra.run.dir={tmp_path}", "reward.answer_metric=vibes")
    assert proc.returncode != 0 and "answer_metric" in proc.stderr
    proc = run_main(f"hydra.run.dir={tmp_path}", "demo.steps=many")
    assert proc.returncode != 0 and "demo.steps" in proc.stderr
    assert not (tmp_path / "metrics.json").exists()
