"""Rollouts scored and summarised: what the reward needs of a rollout, and the metrics of a batch of them.

One place for both, so training, validation and the watch command report the same numbers the same way.
"""

from __future__ import annotations

from collections import Counter

from vrag_rl.data.records import QARecord
from vrag_rl.reward.actor import Scorer
from vrag_rl.reward.judge import OK
from vrag_rl.reward.score import NO_ANSWER, RewardBreakdown, RewardInput
from vrag_rl.rollout.agent_loop import Rollout


def reward_input(rollout: Rollout, record: QARecord) -> RewardInput:
    """What the reward functions need of a finished rollout of ``record``'s question (small to send)."""
    return RewardInput(
        record.question,
        record.answer,
        rollout.answer,
        rollout.retrieved_pages,
        record.gold_pages,
        rollout.num_searches,
        len(rollout.actions),
        rollout.num_invalid,
    )


def score_rollouts(scorer: Scorer, records: dict[str, QARecord], rollouts: list[Rollout]) -> list[RewardBreakdown]:
    """One reward breakdown per rollout; ``records`` maps question ids to their records."""
    return scorer.score([reward_input(r, records[r.task.qid]) for r in rollouts])


def judge_failures(rewards: list[RewardBreakdown]) -> Counter[str]:
    """Answers the judge could not score, by status (timeout, connection_error, ...)."""
    return Counter(b.answer_status for b in rewards if b.answer_status not in (OK, NO_ANSWER))


def rollout_metrics(rollouts: list[Rollout], rewards: list[RewardBreakdown], prefix: str) -> dict[str, float]:
    """Means over the rollouts (reward parts, finish and invalid-action rates, turns, searches, tokens), and the
    share of answers the judge failed to score (0 with rule metrics)."""
    n = len(rollouts)
    actions = sum(len(r.actions) for r in rollouts)
    answered = sum(b.answer_status != NO_ANSWER for b in rewards)
    return {
        f"{prefix}reward": sum(b.total for b in rewards) / n,
        f"{prefix}ndcg": sum(b.ndcg for b in rewards) / n,
        f"{prefix}answer": sum(b.answer for b in rewards) / n,
        f"{prefix}format": sum(b.format for b in rewards) / n,
        f"{prefix}invalid_rate": sum(r.num_invalid for r in rollouts) / max(actions, 1),
        f"{prefix}finish_rate": sum(r.finished for r in rollouts) / n,
        f"{prefix}turns": sum(r.num_turns for r in rollouts) / n,
        f"{prefix}searches": sum(r.num_searches for r in rollouts) / n,
        f"{prefix}response_tokens": sum(sum(r.trajectory.response_mask) for r in rollouts) / n,
        f"{prefix}judge_error_rate": sum(judge_failures(rewards).values()) / max(answered, 1),
    }
