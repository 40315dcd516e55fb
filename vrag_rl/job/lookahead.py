"""The steps' rollout batches, sampled up to ``algo.max_staleness`` steps ahead of training.

With ``k = max_staleness`` > 0, the batch of step ``t`` is submitted to the rollout workers at the start of step
``t - k`` and samples while the trainer updates; the weights of step ``s`` are streamed in after its update, behind
the batches already submitted (``RolloutBackend``: batches and updates take effect in order). So every batch
samples with the weights of a fixed version, ``t - 1 - k`` (or the newest, early on and after a checkpoint),
whatever the timing: the run is reproducible and its staleness (the trainer's version minus the oldest version
of a trajectory's turns) is at most ``k``. A group with a trajectory staler than ``k`` (which that order never
makes, but a caller's own order could) is never trained on: it is dropped and sampled again with the newest
weights, and counted.

A checkpoint is a barrier: nothing is sampled ahead past a step that saves, so a checkpoint holds no buffered
rollouts, the sampler's position in it is the trained one, and a resumed run submits what the straight run
submitted. The ledger (``OUT/ledger.jsonl``) records the questions each trained step consumed, and the
versions that sampled them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vrag_rl.data.records import QARecord
from vrag_rl.job.config import TrainConfig
from vrag_rl.job.sampler import EpochSampler
from vrag_rl.rollout.engine import SamplingConfig
from vrag_rl.rollout.records import Rollout, Task, make_groups
from vrag_rl.rollout.worker import Pending, RolloutBackend, WorkersRestarted

log = logging.getLogger("vrag_rl.grpo")


@dataclass
class StepBatch:
    """One step's questions and their rollouts, as the step trains on them."""

    step: int
    questions: list[QARecord]
    rollouts: list[Rollout]
    wait_s: float  # how long the step waited for its rollouts
    metrics: dict[str, float]  # staleness and dropped groups (offpolicy/)


def step_tasks(step: int, questions: list[QARecord], cfg: TrainConfig) -> list[Task]:
    """The step's tasks; seeds depend on the step only, so a resumed run samples what the straight run sampled."""
    return make_groups([(r.qid, r.question) for r in questions], cfg.algo.group_size, seed=cfg.seed * 1_000_003 + step)


def sample(
    engines: RolloutBackend,
    tasks: list[Task],
    sampling: SamplingConfig,
    resync: Callable[[], object],
    pending: Pending | None = None,
) -> list[Rollout]:
    """Rollouts of ``tasks`` (already under way as ``pending``, or submitted now); when rollout workers had to be
    restarted under the batch (they died or hung), ``resync`` streams the current weights into them and the batch
    runs again, sampling what it would have (seeded tasks; sampled ahead: with the newest weights)."""
    try:
        return (pending if pending is not None else engines.submit(tasks, sampling)).result()
    except WorkersRestarted as err:
        log.warning("%s: streaming the current weights and sampling the batch again", err)
        resync()
        return engines.rollout(tasks, sampling)


def staleness(rollout: Rollout, version: int) -> int:
    """How many versions the oldest turn of a rollout is behind ``version`` (0 for a rollout with no turn)."""
    return version - min(rollout.versions, default=version)


class Lookahead:
    """Submits the steps' batches ahead (``take``), checks their staleness, and keeps the ledger."""

    def __init__(
        self,
        engines: RolloutBackend,
        questions: list[QARecord],
        sampler: EpochSampler,
        cfg: TrainConfig,
        barrier: Callable[[int], bool],
        resync: Callable[[int], object],
    ):
        self.engines, self.questions, self.sampler, self.cfg = engines, questions, sampler, cfg
        self.barrier = barrier  # steps after which nothing may have been sampled ahead (checkpoints)
        self.resync = resync  # streams the trainer's current weights (given their version) into restarted workers
        self.submitted: dict[int, tuple[list[QARecord], Pending]] = {}

    def _submit(self, step: int) -> None:
        questions = [self.questions[i] for i in self.sampler.take(self.cfg.algo.prompts_per_step)]
        self.submitted[step] = questions, self.engines.submit(step_tasks(step, questions, self.cfg), self.cfg.sampling)

    def take(self, step: int) -> StepBatch:
        """Step ``step``'s batch (the engines hold version ``step - 1``), after submitting the later steps' batches
        that may sample with this version."""
        k, last = self.cfg.algo.max_staleness, self.cfg.run.steps
        if step not in self.submitted:
            self._submit(step)
        for ahead in range(step + 1, min(step + k, last) + 1):
            if self.barrier(ahead - 1):
                break
            if ahead not in self.submitted:
                self._submit(ahead)
        t0 = time.perf_counter()
        questions, pending = self.submitted.pop(step)
        resync = lambda: self.resync(step - 1)  # noqa: E731
        rollouts = sample(self.engines, step_tasks(step, questions, self.cfg), self.cfg.sampling, resync, pending)
        rollouts, dropped = self._fresh(step, questions, rollouts)
        wait_s = time.perf_counter() - t0
        ages = [staleness(r, step - 1) for r in rollouts]
        metrics = {
            "offpolicy/staleness_mean": sum(ages) / len(ages),
            "offpolicy/staleness_max": float(max(ages)),
            **{f"offpolicy/staleness_{a}": ages.count(a) / len(ages) for a in range(k + 1)},
            "offpolicy/dropped_groups": float(dropped),
        }
        return StepBatch(step, questions, rollouts, wait_s, metrics)

    def _fresh(self, step: int, questions: list[QARecord], rollouts: list[Rollout]) -> tuple[list[Rollout], int]:
        """The rollouts with every group that holds a trajectory staler than ``max_staleness`` sampled again;
        and how many groups were."""
        stale = {r.task.group for r in rollouts if staleness(r, step - 1) > self.cfg.algo.max_staleness}
        if not stale:
            return rollouts, 0
        again = [t for t in step_tasks(step, questions, self.cfg) if t.group in stale]
        fresh = iter(self.engines.rollout(again, self.cfg.sampling))
        return [next(fresh) if r.task.group in stale else r for r in rollouts], len(stale)


class Ledger:
    """``OUT/ledger.jsonl``: per trained step, its question ids (a group each) and the versions that sampled
    them. A resumed run keeps the lines up to its checkpoint's step and goes on from there."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        lines = path.read_text().splitlines() if path.exists() and resume_step else []
        kept = [line for line in lines if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def record(self, batch: StepBatch) -> None:
        versions = sorted({v for r in batch.rollouts for v in r.versions})
        entry = {"step": batch.step, "qids": [q.qid for q in batch.questions], "versions": versions}
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")


def read_ledger(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
