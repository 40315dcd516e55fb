"""Rewards as a Ray actor: the reward functions over finished rollouts, with the judge client inside.

The actor keeps one ``JudgeClient`` for its lifetime, so the bound on judge requests in flight
(``JudgeConfig.max_in_flight``) holds across a whole step's batch, whose answers go out concurrently.
``RewardScorer`` is the plain class; the actor is ``ray.remote(RewardScorer)``.
"""

from __future__ import annotations

from dataclasses import asdict

from vrag_rl.data.records import QARecord
from vrag_rl.reward.judge import JudgeClient, JudgeConfig
from vrag_rl.reward.score import RewardConfig, RewardInput, score


class RewardScorer:
    def __init__(self, cfg: RewardConfig, judge: JudgeConfig | None = None):
        if cfg.answer_metric == "judge" and judge is None:
            raise ValueError('reward.answer_metric "judge" needs a judge endpoint (judge.base_url, judge.model)')
        self.cfg = cfg
        self.judge = JudgeClient(judge) if judge is not None and cfg.answer_metric == "judge" else None

    def score(self, items: list[tuple[QARecord, dict]]) -> list[dict]:
        """``items``: (question record, rollout summary with answer, retrieved_pages, num_searches,
        num_actions, num_invalid). Returns each reward breakdown as a dict."""
        inputs = [
            RewardInput(
                r.question,
                r.answer,
                s["answer"],
                s["retrieved_pages"],
                r.gold_pages,
                s["num_searches"],
                s["num_actions"],
                s["num_invalid"],
            )
            for r, s in items
        ]
        return [asdict(b) for b in score(inputs, self.cfg, self.judge)]


def rollout_summary(rollout) -> dict:
    """What the reward needs of a rollout, small enough to send to the reward actor."""
    return {
        "answer": rollout.answer,
        "retrieved_pages": rollout.retrieved_pages,
        "num_searches": rollout.num_searches,
        "num_actions": len(rollout.actions),
        "num_invalid": rollout.num_invalid,
    }
