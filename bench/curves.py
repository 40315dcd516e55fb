"""Learning curves, synchronous against one step ahead: the learning test's setting (``tests/test_learning.py``) under
its two seeds, each step's training NDCG and reward on one plot.

    python bench/curves.py                  # 4 runs of 6 steps, about 10 minutes on 2 cores

Each run is the real main job from the cached warm start: 2 training questions x 16 samples, 6 GRPO steps, once
synchronous and once with ``algo.max_staleness=1`` and partial rollouts (token importance weights). The plot goes to
``--plot`` (the README's tiny-recipe section shows it), the per-step values to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ahead import warm_policy  # noqa: E402
from bench.machine import machine  # noqa: E402
from tests.test_learning import AHEAD, SMALL  # noqa: E402  (the setting the test checks)
from tests.test_main import metrics, run_main  # noqa: E402
from vrag_rl.data.paths import cache_dir  # noqa: E402

MODES = {"synchronous": [], "one step ahead": AHEAD}
SEEDS = (0, 1)
KEYS = ("train/ndcg", "train/reward")


def run(mode: str, seed: int, policy: Path, tiny_dir: Path, out: Path) -> dict[str, list[float]]:
    proc = run_main(
        *SMALL, *MODES[mode], f"seed={seed}", f"models.policy={policy}", f"models.tiny_dir={tiny_dir}",
        f"hydra.run.dir={out}", "tracking.wandb=disabled",
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{mode}, seed {seed} failed:\n{proc.stderr[-3000:]}")
    rows = metrics(out)
    return {key: [r[key] for r in rows] for key in KEYS}


def plot(results: dict[str, dict[str, dict[str, list[float]]]], out_png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for i, key in enumerate(KEYS):
        ax = fig.add_subplot(1, len(KEYS), i + 1)
        for m, (mode, by_seed) in enumerate(results.items()):
            for seed, curves in by_seed.items():
                ys = curves[key]
                style = {"color": f"C{m}", "linestyle": "-" if seed == "0" else "--", "marker": "o", "markersize": 3}
                ax.plot(range(1, len(ys) + 1), ys, label=f"{mode}, seed {seed}", **style)
        ax.set_title(f"{key} (training samples)")
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(out_png, format="png", dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("curves-results.json"))
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "tiny-curves.png")
    args = p.parse_args()
    policy, tiny_dir = warm_policy().resolve(), (cache_dir() / "tiny").resolve()  # the kit warm_policy built
    results: dict[str, dict[str, dict[str, list[float]]]] = {mode: {} for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in SEEDS:
            for mode in MODES:
                out = Path(tmp) / f"{mode.replace(' ', '-')}-{seed}"
                results[mode][str(seed)] = curves = run(mode, seed, policy, tiny_dir, out)
                ndcg = curves["train/ndcg"]
                first, last = sum(ndcg[:2]) / 2, sum(ndcg[-2:]) / 2
                print(f"{mode:15} seed {seed}: NDCG {' '.join(f'{v:.2f}' for v in ndcg)} ({first:.2f} -> {last:.2f})")
    plot(results, args.plot)
    args.out.write_text(json.dumps({"machine": machine(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
