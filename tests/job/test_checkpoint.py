"""Checkpoints: committed atomically, pruned only after the commit, and resumed only under the same settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vrag_rl.flat_settings import differences
from vrag_rl.job.checkpoint import (
    check_fingerprint,
    check_run_directory,
    fingerprint,
    finished_checkpoints,
    newest_checkpoint,
    save_checkpoint,
)
from vrag_rl.job.config import TrainConfig
from vrag_rl.job.sampler import EpochSampler


class FileTrainer:
    """Stands in for the trainer's sharded save (tested with the real trainer in test_policy): one file."""

    def __init__(self):
        self.saves = 0

    def save(self, path: Path) -> None:
        self.saves += 1
        (path / "weights.bin").write_bytes(bytes([self.saves]) * 1000)


def test_fingerprint_holds_what_changes_results_and_the_data():
    cfg = TrainConfig()
    current = fingerprint(cfg)
    assert current["algo.clip_high"] == 0.2 and current["seed"] == 0 and "data/qa.parquet" in current
    assert not any(k.startswith(("run.", "tracking.")) for k in current)  # length and logging may change
    longer = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, steps=500))
    assert fingerprint(longer) == current
    other = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, clip_high=0.28), seed=3)
    assert differences(current, fingerprint(other)) == ["algo.clip_high: 0.2 -> 0.28", "seed: 0 -> 3"]


def test_saves_commit_atomically_prune_after_and_drop_cut_saves(tmp_path):
    current, trainer, sampler = fingerprint(TrainConfig()), FileTrainer(), EpochSampler(4, 0)
    cut = tmp_path / "checkpoints" / ".step-000009.tmp" / "trainer"  # what a kill during a save leaves
    cut.mkdir(parents=True)
    (cut / "weights.bin").write_bytes(b"half")
    for step in (1, 2, 3):
        sampler.take(2)
        save_checkpoint(tmp_path, step, trainer, sampler, keep=2, current=current)
    assert [p.name for p in finished_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    newest = newest_checkpoint(tmp_path)
    assert json.loads((newest / "controller.json").read_text()) == {"step": 3, "sampler": {"epoch": 1, "pos": 2}}
    assert (newest / "trainer" / "weights.bin").read_bytes() == bytes([3]) * 1000
    check_fingerprint(newest, current, "the checkpoint")  # the same settings: no complaint


def test_a_used_directory_is_refused_unless_resumed_under_the_same_settings(tmp_path):
    cfg = TrainConfig()
    current = fingerprint(cfg)
    assert check_run_directory(tmp_path, resume=False, current=current) is None  # a fresh directory
    save_checkpoint(tmp_path, 1, FileTrainer(), EpochSampler(4, 0), keep=2, current=current)
    assert check_run_directory(tmp_path, resume=True, current=current) == tmp_path / "checkpoints" / "step-000001"
    with pytest.raises(ValueError, match="already holds a run .*run.resume=false"):
        check_run_directory(tmp_path, resume=False, current=current)
    other = fingerprint(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, micro_batch_tokens=1024)))
    with pytest.raises(ValueError, match="trainer.micro_batch_tokens: 8192 -> 1024"):
        check_run_directory(tmp_path, resume=True, current=other)
    (tmp_path / "checkpoints" / "step-000001" / "fingerprint.json").unlink()
    with pytest.raises(ValueError, match="has no fingerprint.json"):
        check_run_directory(tmp_path, resume=True, current=current)


def test_a_setting_added_since_the_save_counts_at_its_default(tmp_path):
    current = fingerprint(TrainConfig())
    older = {k: v for k, v in current.items() if k != "algo.clip_high"}  # saved before the setting existed
    (tmp_path / "fingerprint.json").write_text(json.dumps(older))
    check_fingerprint(tmp_path, current, "the checkpoint")  # at its default: the same run
    changed = {**current, "algo.clip_high": 0.28}
    with pytest.raises(ValueError, match="algo.clip_high: 0.2 -> 0.28"):
        check_fingerprint(tmp_path, changed, "the checkpoint")


def test_a_part_of_the_settings_is_checked_over_its_own_keys(tmp_path):
    """The supervised warm start's fingerprint holds only the settings it depends on: the rest of the run's
    settings, at their defaults or not, are no difference (a resumed run with SFT steps reuses its warm start)."""
    part = {k: v for k, v in fingerprint(TrainConfig()).items() if k.startswith(("sft.", "models.", "data/"))}
    (tmp_path / "fingerprint.json").write_text(json.dumps(part))
    check_fingerprint(tmp_path, part, "the supervised warm start")
    with pytest.raises(ValueError, match="sft.lr: 1e-05 -> 0.001"):
        check_fingerprint(tmp_path, {**part, "sft.lr": 1e-3}, "the supervised warm start")
