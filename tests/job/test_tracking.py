"""Tracker and plotting against real wandb (offline mode, writing into tmp_path) and real matplotlib."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vrag_rl.job.plots import Line, Panel, dashboard_panels, plot_dashboard, plot_metrics, to_series
from vrag_rl.job.tracking import Tracker, TrackingConfig, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
    # wandb.init leaves its service's address in os.environ (WANDB_SERVICE); tests/conftest.py takes it away after
    # every test.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def metrics(step: int) -> dict[str, float]:
    return {"loss": 1.0 / step, "reward": 0.1 * step}


def steps_in(jsonl: Path) -> list[int]:
    return [json.loads(line)["step"] for line in jsonl.read_text().splitlines()]


def write_rows(jsonl: Path, steps: range) -> None:
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    jsonl.write_text("".join(json.dumps({"step": s, **metrics(s)}) + "\n" for s in steps))


def test_log_writes_jsonl_and_offline_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    logged = {s: metrics(s) for s in (1, 2, 3)}
    with Tracker(run_dir, TrackingConfig(wandb="offline", plot_every=2), {"lr": 1e-6}) as tracker:
        for step, m in logged.items():
            tracker.log(step, m)
        assert (run_dir / "metrics.png").read_bytes().startswith(PNG_MAGIC)  # drawn at step 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": s, **m} for s, m in logged.items()]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    (record,) = runs[0].glob(f"run-{run_id}.wandb")
    assert record.stat().st_size > 0


def test_disabled_wandb_writes_no_run(tmp_path):
    with Tracker(tmp_path / "run", TrackingConfig(wandb="disabled"), {}) as tracker:
        tracker.log(1, metrics(1))
    assert steps_in(tmp_path / "run" / "metrics.jsonl") == [1]
    assert not (tmp_path / "run" / "wandb").exists()


def test_resume_keeps_steps_up_to_checkpoint_and_wandb_id(tmp_path):
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(wandb="offline")
    with Tracker(run_dir, cfg, {}) as tracker:
        for step in range(1, 6):
            tracker.log(step, metrics(step))
    first_id = (run_dir / "wandb_id.txt").read_text()

    tracker = Tracker(run_dir, cfg, {}, resume_step=3)
    assert steps_in(run_dir / "metrics.jsonl") == [1, 2, 3]
    tracker.log(4, metrics(4))
    tracker.close()
    assert steps_in(run_dir / "metrics.jsonl") == [1, 2, 3, 4]
    assert (run_dir / "wandb_id.txt").read_text() == first_id
    assert not list(run_dir.glob("*.tmp"))


def test_fresh_start_in_used_directory_starts_over(tmp_path):
    run_dir = tmp_path / "run"
    write_rows(run_dir / "metrics.jsonl", range(1, 4))
    (run_dir / "wandb_id.txt").write_text("oldrun01\n")
    with Tracker(run_dir, TrackingConfig(wandb="disabled"), {}) as tracker:
        tracker.log(1, metrics(1))
    assert steps_in(run_dir / "metrics.jsonl") == [1]


def test_truncated_last_line_is_dropped_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    jsonl = run_dir / "metrics.jsonl"
    write_rows(jsonl, range(1, 4))
    with jsonl.open("a") as f:
        f.write('{"step": 4, "loss": 0.2')
    with Tracker(run_dir, TrackingConfig(wandb="disabled"), {}, resume_step=10) as tracker:
        assert steps_in(jsonl) == [1, 2, 3]
        tracker.log(4, metrics(4))
    assert steps_in(jsonl) == [1, 2, 3, 4]


def test_malformed_middle_line_is_an_error(tmp_path):
    jsonl = tmp_path / "run" / "metrics.jsonl"
    write_rows(jsonl, range(1, 3))
    jsonl.write_text('{"step": 1\n' + jsonl.read_text())
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        Tracker(tmp_path / "run", TrackingConfig(wandb="disabled"), {}, resume_step=5)


def test_plot_metrics_writes_png(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    rows = [{"step": s, **metrics(s), "note": "text", "flag": True} for s in range(1, 31)]
    rows.append({"step": 31, "kl": 0.01})  # a key first seen late gets its own panel
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_metrics(read_metrics(jsonl), tmp_path / "curves" / "m.png")
    assert out == tmp_path / "curves" / "m.png"
    assert out.read_bytes().startswith(PNG_MAGIC)
    with Image.open(out) as image:
        assert image.width > 0 and image.height > 0
        three_panels = image.size
    narrow = plot_metrics(read_metrics(jsonl), tmp_path / "one.png", keys=["loss"])
    with Image.open(narrow) as image:
        assert image.width < three_panels[0]


def test_plot_metrics_rejects_empty_and_unknown_keys(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no metric rows"):
        plot_metrics(read_metrics(empty), tmp_path / "x.png")
    steps_only = tmp_path / "steps.jsonl"
    steps_only.write_text('{"step": 1}\n{"step": 2, "note": "x"}\n')
    with pytest.raises(ValueError, match="no metric rows"):
        plot_dashboard(read_metrics(steps_only), tmp_path / "x.png")
    write_rows(tmp_path / "m.jsonl", range(1, 3))
    with pytest.raises(ValueError, match="nope"):
        plot_metrics(read_metrics(tmp_path / "m.jsonl"), tmp_path / "x.png", keys=["loss", "nope"])
    assert not (tmp_path / "x.png").exists()


def test_cli_draws_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    write_rows(run_dir / "metrics.jsonl", range(1, 13))
    done = subprocess.run(
        [sys.executable, "-m", "vrag_rl.job.tracking", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pictures = [run_dir / "metrics.png", run_dir / "metrics_all.png"]
    assert done.stdout.split() == [str(p) for p in pictures]
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in pictures)


def training_rows(steps: int, val_every: int) -> list[dict]:
    """Rows shaped like the GRPO loop's: training metrics every step, validation every ``val_every``."""
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "train/reward": 0.1 * s, "train/ndcg": 0.05 * s, "train/answer": 0.0, "train/format": 0.9}
        row |= {"train/finish_rate": 0.8, "train/invalid_rate": 0.1, "actor/entropy": 2.0, "actor/ppo_kl": 1e-3}
        row |= {"actor/pg_clipfrac": 0.01, "time/rollout_s": 5.0, "time/update_s": 3.0, "actor/grad_norm": 1.0}
        if s % val_every == 0:
            row |= {"val/reward": 0.2, "val/ndcg": 0.3, "val/finish_rate": 1.0, "val/synthetic/reward": 0.2}
        rows.append(row)
    return rows


def test_dashboard_draws_validation_on_the_training_axes(tmp_path):
    panels = {p.title: p for p in dashboard_panels(to_series(training_rows(8, 4)))}
    assert list(panels) == [
        "reward",
        "reward parts",
        "retrieval NDCG",
        "finish and invalid-action rates",
        "policy",
        "seconds per phase",
    ]
    assert panels["reward"] == Panel("reward", (Line("train/reward", False), Line("val/reward", True)))
    assert panels["finish and invalid-action rates"].lines == (
        Line("train/finish_rate", False),
        Line("val/finish_rate", True),
        Line("train/invalid_rate", False),
    )
    assert panels["policy"].lines == (
        Line("actor/ppo_kl", False),
        Line("actor/entropy", False, right=True),
        Line("actor/pg_clipfrac", False),
    )
    # Without validation rows the panels hold training alone; metrics outside the dashboard stay in the grid.
    alone = dashboard_panels(to_series(training_rows(3, 10)))
    assert all(not line.validation for p in alone for line in p.lines)
    dashboard = plot_dashboard(training_rows(8, 4), tmp_path / "metrics.png")
    grid = plot_metrics(training_rows(8, 4), tmp_path / "metrics_all.png")
    with Image.open(dashboard) as d, Image.open(grid) as g:
        assert d.height < g.height / 2  # six panels against one per metric


@pytest.mark.parametrize("field, value", [("wandb", "cloud"), ("plot_every", 0)])
def test_bad_config_values_are_rejected(field, value):
    with pytest.raises(ValueError, match=f"TrackingConfig.{field}"):
        TrackingConfig(**{field: value})
