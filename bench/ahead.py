"""Sampling ahead, end to end: the tiny recipe's GRPO steps synchronous (``algo.max_staleness=0``) against one step
ahead with partial rollouts (``algo.max_staleness=1 rollout.partial=true``).

    python bench/ahead.py                       # 8 steps per run, the two modes alternating twice
    python bench/ahead.py --steps 12 --repeats 1

Each run is the real main job (``python -m vrag_rl.main +recipe=tiny_cpu``: Ray, the vLLM CPU engine, the reward
actor, two FSDP2 trainer ranks, weight streaming) from the cached warm start (``sft.steps=0``), validating and
saving only at the end, with wandb off. A step's seconds are its ``time/step_s`` (the wait for its rollouts, then
rewards, log-probs, the updates and the weight sync: the step's wall time from its start to its end); the first
step (engine and trainer warm-up, and in the ahead mode the only step whose batch cannot sample ahead) is left out
of the mean. Also reported: how long steps waited for their rollouts, and the staleness the ahead runs trained on.
On 2 cores the rollout engine and the trainer ranks share the cores, so sampling ahead can only reorder the work,
not overlap it.
Results go to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402

MODES = {
    "sync": ["algo.max_staleness=0"],
    "ahead": ["algo.max_staleness=1", "rollout.partial=true"],
}


def warm_policy() -> Path:
    """The tiny policy after the recipe's warm start, built once and cached (as the tests and benchmarks use it)."""
    from vrag_rl.data.paths import BUNDLED_CORPUS, cache_dir
    from vrag_rl.job.warm import build_warm_policy
    from vrag_rl.models.tiny import TinyConfig, build_tiny_models

    tiny = build_tiny_models(cache_dir() / "tiny", TinyConfig(seed=0))
    return build_warm_policy(tiny["policy"], BUNDLED_CORPUS, cache_dir() / "warm")


def run_job(mode: str, steps: int, policy: Path, out: Path) -> dict:
    """One main job in ``mode``; its per-step times from ``metrics.jsonl``."""
    command = [
        sys.executable, "-m", "vrag_rl.main", "+recipe=tiny_cpu", f"run.steps={steps}", "run.val_every=0",
        "run.save_every=0", "tracking.wandb=disabled", f"run.out_dir={out}", f"models.policy={policy}",
        "sft.steps=0", *MODES[mode],
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step_s" in r]
    later = rows[1:]
    return {
        "mode": mode,
        "job_s": wall,
        "step_s": [r["time/step_s"] for r in rows],
        "mean_step_s": statistics.mean(r["time/step_s"] for r in later),
        "mean_wait_s": statistics.mean(r["time/rollout_s"] for r in later),
        "mean_update_s": statistics.mean(r["time/update_s"] for r in later),
        "staleness_mean": statistics.mean(r.get("offpolicy/staleness_mean", 0.0) for r in later),
        "train_reward": [r["train/reward"] for r in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "ahead-results.json")
    args = ap.parse_args()

    policy, runs = warm_policy(), []
    with tempfile.TemporaryDirectory(prefix="bench-ahead-") as tmp:
        for repeat in range(args.repeats):
            for mode in MODES:
                result = run_job(mode, args.steps, policy, Path(tmp) / f"{mode}-{repeat}")
                print(json.dumps({k: v for k, v in result.items() if k not in ("step_s", "train_reward")}))
                runs.append(result)
    summary = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {key: statistics.median(r[key] for r in mine) for key in ("mean_step_s", "mean_wait_s")}
    summary["ahead_over_sync"] = summary["sync"]["mean_step_s"] / summary["ahead"]["mean_step_s"]
    report = {"machine": machine(), "steps": args.steps, "summary": summary, "runs": runs}
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
