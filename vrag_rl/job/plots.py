"""Pictures of a run's logged metrics rows: a compact dashboard to read first, and every metric in a grid.

The dashboard (``metrics.png``) has six panels: the reward, its answer and format parts, retrieval NDCG, the
finish and invalid-action rates, the policy's KL / entropy / clip fraction, and seconds per phase of a step.
Validation is drawn on the same axes as training (dashed, with markers: it runs every few steps), so a
widening gap reads at a glance. The grid (``metrics_all.png``) is one panel per numeric metric; a log without
any of the dashboard's metrics gets the grid as its dashboard too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Series = dict[str, tuple[list[float], list[float]]]  # metric -> (steps, values)

# (title, metrics): per metric, its validation twin ("train/x" -> "val/x") joins the panel when logged.
DASHBOARD = (
    ("reward", ("train/reward",)),
    ("reward parts", ("train/answer", "train/format")),
    ("retrieval NDCG", ("train/ndcg",)),
    ("finish and invalid-action rates", ("train/finish_rate", "train/invalid_rate")),
    ("policy", ("actor/kl", "actor/ppo_kl", "actor/entropy", "actor/pg_clipfrac")),
    (
        "seconds per phase",
        ("time/rollout_s", "time/reward_s", "time/logprobs_s", "time/update_s", "perf/weight_sync_s"),
    ),
)
TRAINING_STYLE = {"marker": "o", "markersize": 2}
VALIDATION_STYLE = {"linestyle": "--", "marker": "s", "markersize": 4}
RIGHT_AXIS = frozenset({"actor/entropy"})  # nats, two orders above KL and clip fraction: its own scale


@dataclass(frozen=True)
class Line:
    metric: str
    validation: bool  # drawn dashed with markers
    right: bool = False  # on the panel's right-hand axis


@dataclass(frozen=True)
class Panel:
    title: str
    lines: tuple[Line, ...]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def to_series(rows: list[dict[str, Any]]) -> Series:
    """Per numeric metric, its (steps, values) over the rows that have a step; non-finite values are skipped."""
    series: Series = {}
    for row in rows:
        if not is_number(row.get("step")):
            continue
        for key, value in row.items():
            if key != "step" and is_number(value) and math.isfinite(value):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(row["step"])
                ys.append(value)
    if not series:
        raise ValueError("no metric rows to plot")
    return series


def dashboard_panels(series: Series) -> list[Panel]:
    """The dashboard's panels that have something to show, each with the logged training and validation lines."""
    panels = []
    for title, metrics in DASHBOARD:
        lines = []
        for metric in metrics:
            lines += [Line(metric, False, metric in RIGHT_AXIS)] if metric in series else []
            twin = "val/" + metric.removeprefix("train/")
            lines += [Line(twin, True)] if metric.startswith("train/") and twin in series else []
        if lines:
            panels.append(Panel(title, tuple(lines)))
    return panels


def _save(fig, out_png: Path) -> Path:
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and moved into place: a viewer polling the PNG never reads a half-written file.
    tmp = out_png.with_name(out_png.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out_png)
    return out_png


def _figure(panels: int, ncols: int, width: float, height: float, constrained: bool = True):
    # The Agg canvas directly, not pyplot: no global figure state or GUI backend inside a training process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained" if constrained else None)
    if not constrained:  # fixed margins in inches: the constrained layout draws a grid of dozens of panels twice
        w, h = width * ncols, height * nrows
        fig.subplots_adjust(left=0.8 / w, right=1 - 0.2 / w, bottom=0.5 / h, top=1 - 0.35 / h, wspace=0.3, hspace=0.5)
    FigureCanvasAgg(fig)
    return fig, nrows


def _axes(fig, nrows: int, ncols: int, i: int, title: str):
    from matplotlib.ticker import MaxNLocator

    ax = fig.add_subplot(nrows, ncols, i + 1)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 4.5
    ax.grid(alpha=0.3)
    return ax


def plot_dashboard(rows: list[dict[str, Any]], out_png: Path) -> Path:
    """Draw the dashboard of the metrics rows to ``out_png``; returns ``out_png``."""
    series = to_series(rows)
    panels = dashboard_panels(series)
    if not panels:
        return plot_metrics(rows, out_png)
    ncols = min(3, len(panels))
    fig, nrows = _figure(len(panels), ncols, 5.0, 3.4)
    for i, panel in enumerate(panels):
        ax = _axes(fig, nrows, ncols, i, panel.title)
        right = ax.twinx() if any(line.right for line in panel.lines) else None
        colors = {}
        for line in panel.lines:
            base = "train/" + line.metric.removeprefix("val/") if line.validation else line.metric
            color = colors.setdefault(base, f"C{len(colors)}")
            xs, ys = series[line.metric]
            style = VALIDATION_STYLE if line.validation else TRAINING_STYLE
            label = line.metric + (" (right)" if line.right else "")
            (right if line.right else ax).plot(xs, ys, color=color, label=label, **style)
        handles = [h for a in (ax, right) if a is not None for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles=handles, fontsize=7)
    return _save(fig, Path(out_png))


def plot_metrics(rows: list[dict[str, Any]], out_png: Path, keys: list[str] | None = None) -> Path:
    """Draw one panel per metric (x = step) to ``out_png``; returns ``out_png``."""
    series = to_series(rows)
    if keys is None:
        keys = list(series)
    missing = [key for key in keys if key not in series]
    if missing:
        raise ValueError(f"no numeric values for {missing}")
    ncols = min(3, len(keys))
    fig, nrows = _figure(len(keys), ncols, 4.5, 3.0, constrained=False)
    for i, key in enumerate(keys):
        ax = _axes(fig, nrows, ncols, i, key)
        xs, ys = (np.asarray(v, dtype=float) for v in series[key])
        if len(ys) > 10:
            ax.plot(xs, ys, ".", color="tab:blue", alpha=0.3, markersize=3)
            window = max(3, len(ys) // 10)
            csum = np.cumsum(np.insert(ys, 0, 0.0))
            ax.plot(xs[window - 1 :], (csum[window:] - csum[:-window]) / window, color="tab:blue", linewidth=1.2)
        else:
            ax.plot(xs, ys, "o-", color="tab:blue", markersize=3)
    return _save(fig, Path(out_png))
