"""Rewards as a Ray actor: the reward functions over finished trajectories, with the judge client inside.

The actor keeps one ``JudgeClient`` for its lifetime, so the bound on judge requests in flight
(``JudgeConfig.max_in_flight``) holds across a whole step's batch, whose answers go out concurrently.
``RewardScorer`` is the plain class; ``start_reward_actor`` runs it as an actor and returns a ``RemoteScorer``,
which scores like the plain class. Both take ``RewardInput``s and return ``RewardBreakdown``s.
"""

from __future__ import annotations

from typing import Protocol

from vrag_rl.reward.judge import JudgeClient, JudgeConfig
from vrag_rl.reward.score import RewardBreakdown, RewardConfig, RewardInput, score


class Scorer(Protocol):
    def score(self, inputs: list[RewardInput]) -> list[RewardBreakdown]: ...


class RewardScorer:
    def __init__(self, cfg: RewardConfig, judge: JudgeConfig | None = None, judge_key: str | None = None):
        if cfg.answer_metric == "judge" and judge is None:
            raise ValueError(
                'reward.answer_metric "judge" needs a judge endpoint: '
                "+judge=endpoint judge.base_url=URL judge.model=NAME"
            )
        self.cfg = cfg
        use = judge is not None and cfg.answer_metric == "judge"
        self.judge = JudgeClient(judge, judge_key) if use else None

    def score(self, inputs: list[RewardInput]) -> list[RewardBreakdown]:
        return score(inputs, self.cfg, self.judge)


class RemoteScorer:
    """The reward actor seen as a local scorer."""

    def __init__(self, handle):
        self.handle = handle

    def score(self, inputs: list[RewardInput]) -> list[RewardBreakdown]:
        import ray

        return ray.get(self.handle.score.remote(inputs))

    def shutdown(self) -> None:
        import ray

        ray.kill(self.handle)


def start_reward_actor(
    cfg: RewardConfig, judge: JudgeConfig | None, num_cpus: float = 0.1, judge_key: str | None = None
) -> RemoteScorer:
    """``judge_key``: the key of a judge the job serves (an argument Ray keeps in memory, also for restarts)."""
    import ray

    # Stateless: a dead actor is started again and the calls in flight are sent again.
    remote = ray.remote(RewardScorer).options(num_cpus=num_cpus, max_restarts=-1, max_task_retries=3)
    return RemoteScorer(remote.remote(cfg, judge, judge_key))
