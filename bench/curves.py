"""Learning curves, synchronous against one step ahead: the learning test (``tests/test_learning.py``) run as it is,
its four runs (two seeds, each synchronous and one step ahead) kept, their training NDCG and reward on one plot.

    python bench/curves.py                  # 4 runs of 6 steps, about 10 minutes on 2 cores

The runs are the real main job from the cached warm start: 2 training questions x 16 samples, 6 GRPO steps, once
synchronous and once with ``algo.max_staleness=1`` and partial rollouts (token importance weights); the test's
verdicts are printed with the curves. The plot goes to ``--plot`` (the README's tiny-recipe section shows it), the
per-step values to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402

KEYS = ("train/ndcg", "train/reward")


def runs(base: Path) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{mode: {seed: {metric: per-step values}}} of the runs the test left under ``base``."""
    from omegaconf import OmegaConf

    found: dict[str, dict[str, dict[str, list[float]]]] = {"synchronous": {}, "one step ahead": {}}
    for metrics in sorted(base.glob("*/metrics.jsonl")):
        cfg = OmegaConf.load(metrics.parent / ".hydra" / "config.yaml")
        mode = "one step ahead" if cfg.algo.max_staleness else "synchronous"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        found[mode][str(cfg.seed)] = {key: [r[key] for r in rows] for key in KEYS}
    return found


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
    with tempfile.TemporaryDirectory() as tmp:
        test = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp}"]
        verdict = subprocess.run([*test, "tests/test_learning.py"], cwd=ROOT, capture_output=True, text=True)
        results = runs(Path(tmp))
    print(verdict.stdout.strip().splitlines()[-1])
    for mode, by_seed in results.items():
        for seed, curves in by_seed.items():
            ndcg = curves["train/ndcg"]
            first, last = sum(ndcg[:2]) / 2, sum(ndcg[-2:]) / 2
            print(f"{mode:15} seed {seed}: NDCG {' '.join(f'{v:.2f}' for v in ndcg)} ({first:.2f} -> {last:.2f})")
    plot(results, args.plot)
    args.out.write_text(json.dumps({"machine": machine(), "test": verdict.returncode, "results": results}, indent=1))


if __name__ == "__main__":
    main()
