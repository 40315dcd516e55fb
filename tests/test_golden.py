"""Golden metrics: a short tiny run of the main job, compared with the committed ``tests/assets/golden_tiny.json``.

The run: ``python -m vrag_rl.main +recipe=tiny_cpu`` with the overrides below (3 SFT steps, then 2 GRPO steps of
2 questions x 4 samples, validation at the end): every phase of the job on real Ray, vLLM and FSDP, in about a
minute. It starts from a committed copy of the warm policy (``tests/assets/golden_policy``, the warm start's
output with its stamp), not from one built on the machine: the warm start's 300 steps at lr 3e-3 amplify the
kernels' rounding differences between CPUs into different weights (2.5% in the worst tensor between AVX2 and
AVX-512 kernels) and so into different samples, while five steps keep them at rounding size.

Two kinds of metric, two tolerances:
- counted ones (rewards, NDCG, format, finish and invalid-action rates, turns, tokens, the advantages'
  mean size, the learning rate) follow from the sampled tokens and must match to 1e-6: a changed reward,
  advantage or sampling shows here;
- float ones (the SFT NLL, the policy loss, gradient norm, entropy, KL, clip fraction) must match to a
  relative 1e-3 (absolute 1e-5): a changed loss moves them by far more.

Why these hold across CPUs: everything runs in float32, and every process that computes (trainer ranks,
the rollout engine) is a Ray actor with a fractional CPU share, so Ray gives it one OpenMP thread on any
machine; what differs between CPUs is then the rounding of the vector kernels, ~1e-7 relative, which flips a
sampled token only on a near-exact tie. Checked on an AVX-512 machine natively and with the kernels held to
AVX2 (``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2``), both passing against
the same file.

Regenerate with ``VRAG_RL_UPDATE_GOLDEN=1 pytest tests/test_golden.py`` (the test then writes the file and
fails, so a regeneration is never silent). That is legitimate when a change is meant to move the numbers (a
new tiny kit or warm start, then with a fresh copy of ``.cache/warm`` as the golden policy, a recipe change, a
deliberate change of the loss, reward or sampling), with the reason in the commit; it is not a way to make an
unexplained difference go away.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.test_main import ROOT, run_main

GOLDEN = ROOT / "tests" / "assets" / "golden_tiny.json"
POLICY = ROOT / "tests" / "assets" / "golden_policy"
OVERRIDES = [
    "+recipe=tiny_cpu",
    "sft.steps=3",
    "algo.prompts_per_step=2",
    "algo.group_size=4",
    "run.steps=2",
    "run.val_every=2",
    "run.save_every=0",
    "sampling.max_tokens=64",
    "tracking.wandb=disabled",
]
COUNTED = (
    "train/reward",
    "train/ndcg",
    "train/answer",
    "train/format",
    "train/finish_rate",
    "train/invalid_rate",
    "train/turns",
    "train/searches",
    "train/response_tokens",
    "reward/mean_advantage_abs",
    "actor/tokens",
    "actor/lr",
    "val/reward",
    "val/ndcg",
    "val/format",
    "val/finish_rate",
    "val/invalid_rate",
    "val/response_tokens",
)
FLOATS = ("sft/nll", "actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/ppo_kl", "actor/pg_clipfrac")
COUNTED_TOL, REL_TOL, ABS_TOL = 1e-6, 1e-3, 1e-5


def golden_rows(run: Path) -> list[dict[str, float]]:
    """Per step (the SFT steps first, as ``sft-N``), the compared metrics of a finished run."""
    rows = []
    for line in (run / "sft_metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.append({"step": f"sft-{row['step']}", "sft/nll": row["nll"]})
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.append({"step": row["step"], **{k: row[k] for k in COUNTED + FLOATS if k in row}})
    return rows


def mismatches(got: list[dict], want: list[dict]) -> list[str]:
    """Every difference beyond the tolerances, as ``step key: got vs want``."""
    if [r["step"] for r in got] != [r["step"] for r in want]:
        return [f"steps {[r['step'] for r in got]} vs {[r['step'] for r in want]}"]
    out = []
    for g, w in zip(got, want):
        if set(g) != set(w):
            out.append(f"step {g['step']}: metrics {sorted(set(g) ^ set(w))} only on one side")
        for key in sorted(set(g) & set(w) - {"step"}):
            tol = dict(rel_tol=0, abs_tol=COUNTED_TOL) if key in COUNTED else dict(rel_tol=REL_TOL, abs_tol=ABS_TOL)
            if not math.isclose(g[key], w[key], **tol):
                out.append(f"step {g['step']} {key}: {g[key]!r} vs golden {w[key]!r}")
    return out


def test_mismatches_catch_a_changed_loss_reward_or_advantage():
    want = [{"step": "sft-1", "sft/nll": 2.5}, {"step": 1, "train/reward": 0.125, "actor/pg_loss": -0.0125}]
    assert mismatches(json.loads(json.dumps(want)), want) == []
    near = [want[0], {**want[1], "actor/pg_loss": -0.0125 * (1 + 1e-4)}]  # kernel rounding: passes
    assert mismatches(near, want) == []
    for key, value in (("actor/pg_loss", -0.0126), ("train/reward", 0.125 + 1 / 32)):
        assert mismatches([want[0], {**want[1], key: value}], want) == [
            f"step 1 {key}: {value!r} vs golden {want[1][key]!r}"
        ]
    assert mismatches([want[0], {**want[1], "reward/mean_advantage_abs": 0.5}], want)
    assert mismatches(want[:1], want)


@pytest.mark.slow
def test_tiny_run_matches_golden_metrics(tmp_path, tiny_dirs):
    proc = run_main(
        *OVERRIDES,
        f"models.policy={POLICY}",
        f"models.tiny_dir={tiny_dirs['policy'].parent}",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = golden_rows(tmp_path)
    if os.environ.get("VRAG_RL_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
        pytest.fail(f"wrote {GOLDEN}: commit it with the reason the numbers changed")
    assert mismatches(got, json.loads(GOLDEN.read_text())) == []
