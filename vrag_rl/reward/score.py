"""Trajectory reward: α·retrieval NDCG + β·answer score + γ·format score, behind a format gate."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from vrag_rl.reward.answer import anls, exact_match, token_f1
from vrag_rl.reward.judge import OK, JudgeClient, JudgeItem
from vrag_rl.reward.ndcg import retrieval_ndcg

_RULE_METRICS = {"exact_match": exact_match, "f1": token_f1, "anls": anls}
ANSWER_METRICS = ("judge", *_RULE_METRICS)
NO_ANSWER = "no_answer"  # answer_status of a trajectory that never answered


@dataclass
class RewardConfig:
    ndcg_weight: float = 0.2
    answer_weight: float = 0.7
    format_weight: float = 0.1
    require_search: bool = True  # no search in the trajectory -> total 0
    require_answer: bool = True  # no final answer -> total 0
    # "judge" needs a JudgeClient; the rule metrics need nothing, hence the default.
    answer_metric: str = "f1"

    def __post_init__(self) -> None:
        if self.answer_metric not in ANSWER_METRICS:
            raise ValueError(f"answer_metric must be one of {ANSWER_METRICS}, got {self.answer_metric!r}")
        for name in ("ndcg_weight", "answer_weight", "format_weight"):
            weight = getattr(self, name)
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {weight}")


@dataclass
class RewardInput:
    question: str
    reference: str | list[str]  # one answer or all acceptable answers
    prediction: str | None  # the final answer; None if the trajectory never answered
    retrieved_pages: list[str]  # page ids in retrieval order; crops excluded
    gold_pages: list[str]
    num_searches: int
    num_actions: int  # all action turns, valid and invalid
    num_invalid: int

    def __post_init__(self) -> None:
        if min(self.num_searches, self.num_actions, self.num_invalid) < 0 or self.num_invalid > self.num_actions:
            raise ValueError(
                f"need 0 <= num_invalid <= num_actions and num_searches >= 0, got searches={self.num_searches} "
                f"actions={self.num_actions} invalid={self.num_invalid}"
            )


@dataclass(frozen=True)
class RewardBreakdown:
    total: float
    ndcg: float
    answer: float
    format: float
    gated: bool  # a required search/answer was missing, so total is 0; the parts are still reported
    answer_status: str  # "ok", "no_answer", or the judge's failure status (then answer is 0)


def format_score(num_actions: int, num_invalid: int) -> float:
    """Share of well-formed actions: 1.0 when every action was valid, 0.0 for a trajectory with no actions."""
    return (num_actions - num_invalid) / num_actions if num_actions else 0.0


def _answer_scores(
    inputs: Sequence[RewardInput], cfg: RewardConfig, judge: JudgeClient | None
) -> list[tuple[float, str]]:
    answered = [i for i, item in enumerate(inputs) if item.prediction is not None]
    scores: list[tuple[float, str]] = [(0.0, NO_ANSWER)] * len(inputs)
    if cfg.answer_metric == "judge":
        batch = [JudgeItem(inputs[i].question, inputs[i].reference, inputs[i].prediction) for i in answered]
        for i, result in zip(answered, judge.judge_batch(batch), strict=True):
            # A failed judgement earns nothing: rewarding it would pay for endpoint faults.
            scores[i] = (1.0 if result.status == OK and result.correct else 0.0, result.status)
    else:
        metric = _RULE_METRICS[cfg.answer_metric]
        for i in answered:
            scores[i] = (metric(inputs[i].prediction, inputs[i].reference), OK)
    return scores


def score(inputs: Sequence[RewardInput], cfg: RewardConfig, judge: JudgeClient | None = None) -> list[RewardBreakdown]:
    """Reward every trajectory; with the judge metric, all answered trajectories go out as one concurrent batch."""
    if cfg.answer_metric == "judge" and judge is None:
        raise ValueError('answer_metric "judge" needs a JudgeClient')
    breakdowns = []
    for item, (answer, status) in zip(inputs, _answer_scores(inputs, cfg, judge), strict=True):
        ndcg = retrieval_ndcg(item.retrieved_pages, item.gold_pages)
        fmt = format_score(item.num_actions, item.num_invalid)
        gated = (cfg.require_search and item.num_searches == 0) or (cfg.require_answer and item.prediction is None)
        total = 0.0 if gated else cfg.ndcg_weight * ndcg + cfg.answer_weight * answer + cfg.format_weight * fmt
        breakdowns.append(RewardBreakdown(total, ndcg, answer, fmt, gated, status))
    return breakdowns
