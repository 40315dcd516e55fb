"""The schedule of sampling ahead (``job/lookahead.py``), on a backend that keeps the ordering contract of the rollout
pool (a batch samples with the weights of the last update given before it; the pool's own test shows the pool does)
and records what it was asked. The main job runs it on Ray and vLLM (``tests/test_main.py``)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.algo.config import AlgoConfig
from vrag_rl.data.records import QARecord
from vrag_rl.job.config import RunConfig, TrainConfig
from vrag_rl.job.lookahead import Ledger, Lookahead, read_ledger, step_tasks
from vrag_rl.job.sampler import EpochSampler
from vrag_rl.rollout.records import Rollout
from vrag_rl.rollout.worker import Done, WorkersRestarted

QUESTIONS = [QARecord(f"q{i}", f"question {i}", "a", [], None, "text", "", "test") for i in range(7)]


class OrderedBackend:
    """Rollouts tagged with the version of the last update before their submission; a log of the calls."""

    def __init__(self):
        self.version, self.calls = 0, []

    def submit(self, tasks, sampling):
        self.calls.append(("submit", tasks[0].seed, self.version))
        return Done([Rollout(t, Trajectory(), versions=[self.version]) for t in tasks])

    def rollout(self, tasks, sampling):
        return self.submit(tasks, sampling).result()

    def load(self, version):
        self.calls.append(("update", version))
        self.version = version


def config(max_staleness: int, steps: int = 6, save_every: int = 0) -> TrainConfig:
    algo = AlgoConfig(prompts_per_step=2, group_size=2, mini_batches=1, max_staleness=max_staleness)
    return replace(TrainConfig(), algo=algo, run=RunConfig(steps=steps, val_every=0, save_every=save_every))


def train(cfg: TrainConfig, backend: OrderedBackend, ledger: Ledger, first: int = 1, sampler=None) -> Lookahead:
    """The controller's loop without the update: take a batch, record it, stream the step's weights."""
    sampler = sampler or EpochSampler(len(QUESTIONS), cfg.seed)
    saves = lambda s: s == cfg.run.steps or bool(cfg.run.save_every and s % cfg.run.save_every == 0)  # noqa: E731
    batches = Lookahead(backend, QUESTIONS, sampler, cfg, barrier=saves, resync=backend.load)
    for step in range(first, cfg.run.steps + 1):
        batch = batches.take(step)
        ledger.record(batch)
        backend.load(step)
        assert batch.metrics["offpolicy/staleness_max"] <= cfg.algo.max_staleness
    return batches


def test_staleness_zero_samples_every_step_with_the_newest_weights(tmp_path):
    backend = OrderedBackend()
    train(config(0), backend, Ledger(tmp_path / "ledger.jsonl", 0))
    assert [e["versions"] for e in read_ledger(tmp_path / "ledger.jsonl")] == [[v] for v in range(6)]
    assert [c[0] for c in backend.calls] == ["submit", "update"] * 6


@pytest.mark.parametrize("k", [1, 2])
def test_each_batch_samples_k_versions_behind_the_step_that_trains_it(tmp_path, k):
    backend = OrderedBackend()
    batches = train(config(k), backend, Ledger(tmp_path / "ledger.jsonl", 0))
    ledger = read_ledger(tmp_path / "ledger.jsonl")
    assert [e["versions"] for e in ledger] == [[max(0, step - 1 - k)] for step in range(1, 7)]
    assert not batches.submitted  # nothing left under way after the last step
    # the same questions, in the same order, as the synchronous run
    sync = tmp_path / "sync.jsonl"
    train(config(0), OrderedBackend(), Ledger(sync, 0))
    assert [e["qids"] for e in ledger] == [e["qids"] for e in read_ledger(sync)]


def test_a_checkpoint_is_a_barrier_and_a_resume_submits_what_the_straight_run_did(tmp_path):
    cfg = config(1, steps=6, save_every=3)
    straight = OrderedBackend()
    train(cfg, straight, Ledger(tmp_path / "straight.jsonl", 0))
    versions = [e["versions"] for e in read_ledger(tmp_path / "straight.jsonl")]
    assert versions == [[0], [0], [1], [3], [3], [4]]  # step 4 samples after step 3's save, with its weights

    # a run killed during step 5 (its ledger has lines past the checkpoint), resumed from step 3's checkpoint
    path = tmp_path / "resumed.jsonl"
    path.write_text("".join(line + "\n" for line in (tmp_path / "straight.jsonl").read_text().splitlines()[:4]))
    sampler = EpochSampler(len(QUESTIONS), cfg.seed)
    sampler.take(3 * cfg.algo.prompts_per_step)  # the checkpoint's sampler position: three steps trained
    resumed = OrderedBackend()
    resumed.load(3)
    train(cfg, resumed, Ledger(path, resume_step=3), first=4, sampler=sampler)
    assert read_ledger(path) == read_ledger(tmp_path / "straight.jsonl")
    assert resumed.calls[1:] == straight.calls[-len(resumed.calls) + 1 :]


def test_a_group_staler_than_the_bound_is_dropped_and_sampled_again(tmp_path):
    cfg = config(1)
    backend = OrderedBackend()
    batches = Lookahead(backend, QUESTIONS, EpochSampler(len(QUESTIONS), 0), cfg, lambda s: False, lambda v: None)
    batches._submit(3)  # a caller's own order: step 3's batch with version 0
    backend.load(1)
    backend.load(2)
    batch = batches.take(3)
    assert batch.metrics["offpolicy/dropped_groups"] == 2
    assert {v for r in batch.rollouts for v in r.versions} == {2}
    assert [r.task for r in batch.rollouts] == step_tasks(3, batch.questions, cfg)  # the same seeds


class Lost:
    """A batch whose workers died under it."""

    def result(self):
        raise WorkersRestarted("rollout workers were restarted")


def test_a_batch_lost_with_its_workers_is_sampled_again_with_the_current_weights(tmp_path):
    backend = OrderedBackend()
    batches = Lookahead(backend, QUESTIONS, EpochSampler(len(QUESTIONS), 0), config(1), lambda s: False, backend.load)
    first = batches.take(1)  # step 2's batch is now under way, with version 0
    questions, _ = batches.submitted[2]
    batches.submitted[2] = questions, Lost()
    backend.load(1)
    batch = batches.take(2)
    assert batch.questions == questions and {v for r in batch.rollouts for v in r.versions} == {1}
    assert [r.task for r in batch.rollouts] == step_tasks(2, questions, config(1))
    assert first.questions != questions
