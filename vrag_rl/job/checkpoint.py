"""Checkpoints of the GRPO run and what may resume from them.

``OUT/checkpoints/step-NNNNNN/`` holds the trainer's sharded state (``trainer/``), the controller's state
(``controller.json``: step and data position) and the run's ``fingerprint.json``. A checkpoint is committed
atomically: everything is written into ``.step-NNNNNN.tmp/``, flushed to disk (fsync of every file and
folder), then renamed into place, and only then are older checkpoints pruned; a save cut short by a kill
leaves a hidden temporary folder that no resume reads and the next save removes.

The fingerprint is every setting that changes what a run computes (the whole config but ``run`` and
``tracking``, which say how long to run and where to log) and the digests of the corpus's question and page
manifests. A run resumes only from a checkpoint with its own fingerprint, and the supervised warm start in
``OUT/sft`` is reused only under the same fingerprint: otherwise the run stops and names the keys that
differ, rather than continuing another experiment under this one's name. A setting that a later version of
the code added is compared at its default, so an upgrade that leaves defaults alone keeps runs resumable.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from vrag_rl.data.records import sha256_file
from vrag_rl.flat_settings import differences, flatten
from vrag_rl.job.config import TrainConfig
from vrag_rl.job.sampler import EpochSampler
from vrag_rl.learner.trainer import Trainer

CHECKPOINT = "step-{:06d}"
FINGERPRINT = "fingerprint.json"
NOT_RESULTS = ("run", "tracking")  # how long to run and where to log: free to change on resume


def fingerprint(cfg: TrainConfig) -> dict[str, object]:
    """Flat ``{dotted.key: value}`` of the settings that change results, plus the corpus manifests' digests."""
    flat = flatten({k: v for k, v in asdict(cfg).items() if k not in NOT_RESULTS})
    corpus = Path(cfg.data.corpus)
    for name in ("qa.parquet", "pages.parquet"):
        flat[f"data/{name}"] = sha256_file(corpus / name)
    if cfg.sft.teacher_data:
        flat["data/teacher"] = sha256_file(cfg.sft.teacher_data)
    return flat


def setting_defaults() -> dict[str, object]:
    """The fingerprint's settings at their defaults (``TrainConfig()``)."""
    return flatten({k: v for k, v in asdict(TrainConfig()).items() if k not in NOT_RESULTS})


def check_fingerprint(directory: Path, current: dict[str, object], what: str) -> None:
    """Stop unless ``directory`` was made under the current fingerprint (``what`` names it in the error)."""
    path = directory / FINGERPRINT
    if not path.is_file():
        raise ValueError(f"{what} {directory} has no {FINGERPRINT}: it was made by an older version; start anew")
    # A setting added since the save reads as its default: the saved run ran as that default does. Only the
    # settings ``current`` covers count (the warm start's fingerprint is a part of the run's).
    defaults = {k: v for k, v in setting_defaults().items() if k in current}
    diff = differences({**defaults, **json.loads(path.read_text())}, current)
    if diff:
        raise ValueError(
            f"{what} {directory} was made with other settings or data; they would not continue this run:\n  "
            + "\n  ".join(diff[:20])
            + "\nSet them back, or use another run directory (hydra.run.dir=...)."
        )


def finished_checkpoints(out: Path) -> list[Path]:
    """Committed checkpoints in step order (a temporary folder of a cut save is not one)."""
    return sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "controller.json").is_file())


def newest_checkpoint(out: Path) -> Path | None:
    done = finished_checkpoints(out)
    return done[-1] if done else None


def check_run_directory(out: Path, resume: bool, current: dict[str, object]) -> Path | None:
    """The checkpoint to resume from, if any, after refusing directories that would mix two runs."""
    newest = newest_checkpoint(out)
    if newest is None:
        return None
    if not resume:
        raise ValueError(
            f"{out} already holds a run (checkpoints up to {newest.name}) and run.resume=false: starting over "
            "there would mix two runs' checkpoints and logs. Use another run directory (hydra.run.dir=...) or "
            "run.resume=true."
        )
    check_fingerprint(newest, current, "the checkpoint")
    return newest


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file and folder below ``root``, deepest first, then ``root``: all on disk before the rename."""
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        _fsync(path)


def save_checkpoint(
    out: Path, step: int, trainer: Trainer, sampler: EpochSampler, keep: int, current: dict[str, object]
) -> Path:
    """Commit a checkpoint of ``step`` atomically (see the module docstring), then keep the newest ``keep``."""
    root = out / "checkpoints"
    final, tmp = root / CHECKPOINT.format(step), root / f".{CHECKPOINT.format(step)}.tmp"
    for stale in root.glob(".step-*.tmp"):  # saves cut short by a kill
        shutil.rmtree(stale, ignore_errors=True)
    (tmp / "trainer").mkdir(parents=True)
    trainer.save(tmp / "trainer")
    (tmp / FINGERPRINT).write_text(json.dumps(current, indent=1, sort_keys=True))
    state = {"step": step, "sampler": sampler.state()}  # every seed derives from (run seed, step)
    (tmp / "controller.json").write_text(json.dumps(state))
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)  # an older run's checkpoint of the same step, resumed over
    tmp.rename(final)
    _fsync(root)  # the rename itself
    for old in finished_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
