"""Metric tracking for the training loop: a resumable JSON-lines log, optional wandb, and PNG pictures.

``metrics.jsonl`` in the run directory is the record of truth: one ``{"step": ..., **metrics}`` object per
logged step, flushed as it is written, so a killed run keeps everything it logged and the pictures can be
redrawn without wandb (``python -m vrag_rl.job.tracking RUN_DIR``): ``metrics.png``, the dashboard to read
first, and ``metrics_all.png``, every metric (``job/plots.py``). A run resumed from a step-k
checkpoint recomputes the steps after k, so the tracker first cuts the log back to steps <= k, and reuses the
wandb run id saved in the run directory so wandb continues the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from vrag_rl.job.plots import is_number, plot_dashboard, plot_metrics

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class TrackingConfig:
    wandb: str = "offline"
    project: str = "vrag-rl"
    name: str | None = None
    plot_every: int = 10  # redraw metrics.png every n logged steps (and at close)

    def __post_init__(self) -> None:
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"TrackingConfig.wandb must be one of {WANDB_MODES}, got {self.wandb!r}")
        if self.plot_every < 1:
            raise ValueError(f"TrackingConfig.plot_every must be >= 1, got {self.plot_every}")


def read_metrics(jsonl: Path) -> list[dict[str, Any]]:
    """The logged rows; a last line cut short by a kill is dropped, a malformed line elsewhere is an error."""
    lines = Path(jsonl).read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{jsonl}:{i + 1}: malformed metrics line") from None
    return rows


class Tracker:
    """Appends metrics to ``out_dir/metrics.jsonl``, mirrors them to wandb, and redraws the pictures.

    ``resume_step=k`` keeps the logged steps <= k and continues the wandb run saved in the directory;
    ``resume_step=0`` is a fresh start: an existing log is emptied and wandb gets a new run id.
    """

    def __init__(self, out_dir: Path, cfg: TrackingConfig, config: dict, resume_step: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.jsonl = self.out_dir / "metrics.jsonl"
        self.png = self.out_dir / "metrics.png"
        self.grid_png = self.out_dir / "metrics_all.png"
        self._rows = self._truncate(resume_step) if self.jsonl.exists() else 0
        self._logged = 0
        self._file = self.jsonl.open("a")
        self._closed = False
        self._run: Any = None
        if cfg.wandb != "disabled":
            # Imported here: plotting and disabled runs should not pay wandb's import time.
            import wandb

            self._run = wandb.init(
                project=cfg.project,
                name=cfg.name,
                dir=str(self.out_dir),
                config=config,
                mode=cfg.wandb,
                id=self._wandb_id(resume_step),
                resume="allow",
                settings=wandb.Settings(silent=True),
            )

    def _truncate(self, resume_step: int) -> int:
        kept = [row for row in read_metrics(self.jsonl) if is_number(row.get("step")) and row["step"] <= resume_step]
        tmp = self.jsonl.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.jsonl)
        return len(kept)

    def _wandb_id(self, resume_step: int) -> str:
        """The saved id when resuming; a fresh run gets a new id so its steps do not collide with an old run's."""
        path = self.out_dir / "wandb_id.txt"
        if resume_step > 0 and path.exists():
            return path.read_text().strip()
        run_id = secrets.token_hex(4)
        path.write_text(run_id + "\n")
        return run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._closed:
            raise RuntimeError("Tracker.log called after close()")
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step number and cannot be a metric name")
        # default=float turns numpy and torch scalars into plain numbers.
        self._file.write(json.dumps({"step": step, **metrics}, default=float) + "\n")
        self._file.flush()
        self._rows += 1
        self._logged += 1
        if self._run is not None:
            self._run.log(dict(metrics), step=step)
        if self._logged % self.cfg.plot_every == 0:
            self.plot()

    def plot(self) -> None:
        """Redraw the dashboard and the grid from the log."""
        rows = read_metrics(self.jsonl)
        plot_dashboard(rows, self.png)
        plot_metrics(rows, self.grid_png)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._file.close()
        if self._rows:
            self.plot()
        if self._run is not None:
            self._run.finish()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw a run's metrics.jsonl: the dashboard and every metric.")
    parser.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    parser.add_argument("--keys", help="comma-separated metrics for the grid (default: every numeric metric)")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    rows = read_metrics(args.run_dir / "metrics.jsonl")
    print(plot_dashboard(rows, args.run_dir / "metrics.png"))
    print(plot_metrics(rows, args.run_dir / "metrics_all.png", keys))


if __name__ == "__main__":
    main()
