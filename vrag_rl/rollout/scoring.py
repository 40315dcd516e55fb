"""Rollouts scored and summarised: what the reward needs of a rollout, and the metrics of a batch of them.

One place for both, so training, validation and the watch command report the same numbers the same way.
"""

from __future__ import annotations

from collections import Counter

from vrag_rl.agent.actions import ActionKind
from vrag_rl.data.records import QARecord
from vrag_rl.reward.actor import Scorer
from vrag_rl.reward.judge import OK
from vrag_rl.reward.score import NO_ANSWER, RewardBreakdown, RewardInput
from vrag_rl.rollout.records import Rollout, StopReason


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


def process_counts(rollout: Rollout) -> dict[str, int | bool]:
    """What one trajectory did: turns, actions (and how many were invalid), searches, crops asked for and shown,
    whether it answered, its tokens, and the turns its engine failed to produce."""
    return {
        "turns": rollout.num_turns,
        "actions": len(rollout.actions),
        "invalid": rollout.num_invalid,
        "searches": rollout.num_searches,
        "crops": sum(a.kind == ActionKind.BBOX for a in rollout.actions),
        "crops_shown": len(rollout.crops),
        "finished": rollout.finished,
        "response_tokens": sum(rollout.trajectory.response_mask),
        "tokens": len(rollout.trajectory),
        "engine_errors": len(rollout.engine_errors),
        "timed_out": rollout.stop_reason == StopReason.TIMEOUT,
    }


def process_rates(counts: list[dict[str, int | bool]]) -> dict[str, float]:
    """Over trajectories: the invalid-action rate (of all actions), the finish and timeout rates, and means per
    trajectory."""
    n = max(len(counts), 1)
    rates = {
        "invalid_rate": sum(c["invalid"] for c in counts) / max(sum(c["actions"] for c in counts), 1),
        "finish_rate": sum(c["finished"] for c in counts) / n,
        "timeout_rate": sum(c.get("timed_out", False) for c in counts) / n,  # evaluation rows may predate it
    }
    for key in ("turns", "searches", "crops", "crops_shown", "response_tokens", "tokens", "engine_errors"):
        rates[key] = sum(c[key] for c in counts) / n
    return rates


def rollout_metrics(rollouts: list[Rollout], rewards: list[RewardBreakdown], prefix: str) -> dict[str, float]:
    """Means over the rollouts (reward parts, ``process_rates``), and the share of answers the judge failed to
    score (0 with rule metrics)."""
    n = len(rollouts)
    answered = sum(b.answer_status != NO_ANSWER for b in rewards)
    metrics = {
        f"{prefix}reward": sum(b.total for b in rewards) / n,
        f"{prefix}ndcg": sum(b.ndcg for b in rewards) / n,
        f"{prefix}answer": sum(b.answer for b in rewards) / n,
        f"{prefix}format": sum(b.format for b in rewards) / n,
    }
    metrics |= {prefix + k: v for k, v in process_rates([process_counts(r) for r in rollouts]).items()}
    metrics[f"{prefix}judge_error_rate"] = sum(judge_failures(rewards).values()) / max(answered, 1)
    return metrics
