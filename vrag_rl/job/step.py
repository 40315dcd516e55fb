"""One GRPO step, given its collaborators: the rollout ``engines``, a ``Scorer``, a ``Trainer`` (``job/grpo.py``
runs one per training step).

``grpo_step``: the step's batch (``algo.group_size`` seeded rollouts per question, ``job/lookahead.py``) → rewards
→ group advantages → old (and reference) log-probs → ``algo.epochs`` x ``algo.mini_batches`` updates → the new
weights, which the controller streams from the trainer into the engines bucket by bucket (``sync_weights``) → the
step's metrics. It runs the same on Ray actors and in one process. An update with a non-finite loss or gradient
is skipped (``actor/skipped_updates``); ``run.max_consecutive_skips`` of them in a row stop the run. Weights that
are not finite are never streamed to the engines or saved: the step stops the run instead. Rollout workers that
die or hang mid-batch are started again, given the current weights, and the batch is sampled again
(``lookahead.sample``).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch

from vrag_rl.algo.advantages import grpo_advantages, rloo_advantages
from vrag_rl.algo.config import AlgoConfig
from vrag_rl.algo.correction import mismatch_metrics, trajectory_weights
from vrag_rl.job.config import TrainConfig
from vrag_rl.job.lookahead import StepBatch
from vrag_rl.learner.batch import minibatches_by_group
from vrag_rl.learner.payloads import Batch, Objective
from vrag_rl.learner.trainer import Trainer
from vrag_rl.reward.actor import Scorer
from vrag_rl.reward.score import RewardBreakdown
from vrag_rl.rollout.scoring import rollout_metrics, score_rollouts
from vrag_rl.rollout.worker import RolloutBackend, WeightSync

log = logging.getLogger("vrag_rl.grpo")


@dataclass
class StepResult:
    """What one GRPO step did: its metrics, and per rollout its group, reward and advantage."""

    metrics: dict[str, float]
    group_ids: list[int]
    rewards: list[RewardBreakdown]
    advantages: list[float]
    skipped: list[bool]  # per optimizer update, in order: skipped for a non-finite loss or gradient


def objective(cfg: TrainConfig) -> Objective:
    """The GRPO trainer's fixed settings: the loss, and the temperature its log-probs are read at."""
    return Objective(cfg.algo, cfg.sampling.logprob_temperature)


def grpo_step(
    batch: StepBatch, engines: RolloutBackend, scorer: Scorer, trainer: Trainer, cfg: TrainConfig
) -> StepResult:
    """One GRPO step on a batch of rollouts (``algo.group_size`` per question); see the module docstring."""
    algo, step, rollouts = cfg.algo, batch.step, batch.rollouts
    times = {"time/rollout_s": batch.wait_s}  # sampled ahead (algo.max_staleness): only what the step waited
    t0 = time.perf_counter()
    rewards = score_rollouts(scorer, {r.qid: r for r in batch.questions}, rollouts)
    totals = torch.tensor([b.total for b in rewards], dtype=torch.float32)
    group_ids = [r.task.group for r in rollouts]
    if algo.advantage == "grpo":
        advantages = grpo_advantages(totals, group_ids, norm_by_std=algo.norm_by_std).tolist()
    else:
        advantages = rloo_advantages(totals, group_ids).tolist()
    times["time/reward_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    inputs = Batch([r.trajectory for r in rollouts], advantages)
    offpolicy = add_logprobs(inputs, trainer, algo)
    times["time/logprobs_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    update: dict[str, float] = {}
    skipped: list[bool] = []
    rng = random.Random(cfg.seed * 7_919 + step)
    for _ in range(algo.epochs):
        for indices in minibatches_by_group(group_ids, algo.mini_batches, rng):
            metrics = trainer.grpo_update(inputs.take(indices))
            skipped.append(metrics.pop("skipped_updates") > 0)
            for k, v in metrics.items():
                update[k] = update.get(k, 0.0) + v / (algo.epochs * algo.mini_batches)
    lr = trainer.end_step()
    times["time/update_s"] = time.perf_counter() - t0

    if not trainer.weights_finite():
        raise FloatingPointError(f"step {step}: the policy's weights are not finite; not syncing or saving them")
    sync = sync_weights(trainer, engines, cfg.rollout.bucket_bytes, version=step)
    step_s = sum(times.values()) + sync.seconds
    metrics = {
        **rollout_metrics(rollouts, rewards, "train/"),
        **{f"actor/{k}": v for k, v in update.items()},
        **{f"offpolicy/{k}": v for k, v in offpolicy.items()},
        **batch.metrics,
        "actor/lr": lr,
        "actor/skipped_updates": float(sum(skipped)),
        **times,
        "time/step_s": step_s,
        "perf/tokens_per_s": inputs.response_tokens / step_s,
        "perf/weight_sync_s": sync.seconds,
        "perf/weight_sync_bytes": float(sync.bytes),
        "reward/mean_advantage_abs": sum(abs(a) for a in advantages) / len(advantages),
    }
    return StepResult(metrics, group_ids, rewards, advantages, skipped)


def add_logprobs(batch: Batch, trainer: Trainer, algo: AlgoConfig) -> dict[str, float]:
    """The batch's old log-probs (``algo.old_logprobs``), reference log-probs (a KL term) and importance weights
    (``algo.is_level``). Returns the engine-trainer mismatch and the weights' metrics, measured when the trainer
    read the sampling weights itself (``old_logprobs=recompute``)."""
    engine = [t.engine_logprobs for t in batch.trajectories] if algo.old_logprobs != "update" else []
    metrics: dict[str, float] = {}
    if algo.old_logprobs == "recompute":
        batch.old_logprobs = trainer.logprobs(batch.trajectories)
        turns = [t.turn_lengths for t in batch.trajectories]
        metrics |= {f"mismatch_{k}": v for k, v in mismatch_metrics(batch.old_logprobs, engine, turns).items()}
        if algo.correction.on:
            batch.is_weights, weighted = trajectory_weights(batch.old_logprobs, engine, algo.correction)
            metrics |= weighted
    elif algo.old_logprobs == "rollout":
        batch.old_logprobs = engine  # "update": None, the update's own forward stands for the weights that sampled
    if algo.kl_coef > 0:
        batch.ref_logprobs = trainer.logprobs(batch.trajectories, reference=True)
    return metrics


def sync_weights(trainer: Trainer, engines: RolloutBackend, bucket_bytes: int, version: int) -> WeightSync:
    """The trainer's current weights (``version``: the steps they have taken) into every rollout engine, one
    bucket at a time."""
    return engines.update_weights(trainer.weight_buckets(bucket_bytes), version)
