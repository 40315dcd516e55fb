"""The trainer as the controller sees it (``Trainer``), and its in-process implementation (``LocalTrainer``).

The controller gives each call one typed value: trajectories, or a ``Batch`` for a GRPO update. The objective
(loss settings and log-prob temperature) is given once, when the trainer is built. Weights leave as buckets of
named tensors (``weight_buckets``), which the controller streams into the rollout engines: the learner knows
nothing of rollouts.

``ranks.TrainerGroup`` is the same interface over Ray trainer ranks; ``LocalTrainer`` over one in-process
``PolicyTrainer``: no Ray, no process group (the cached warm start, the in-process GRPO step test, benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.learner.batch import split_over_ranks
from vrag_rl.learner.config import TrainerConfig
from vrag_rl.learner.export import write_hf_checkpoint
from vrag_rl.learner.payloads import Batch, Objective, RankShare, WeightBucket, iter_buckets
from vrag_rl.learner.policy import PolicyTrainer

GRPO_PER_TOKEN = ("pg_clipfrac", "ppo_kl", "entropy", "kl")  # metrics summed per token, reported as means
SFT_PER_TOKEN = ("nll",)


class Trainer(Protocol):
    """What the GRPO controller and the SFT loop need of a trainer, however many ranks it has."""

    def logprobs(self, trajectories: list[Trajectory], reference: bool = False) -> list[torch.Tensor]: ...

    def grpo_update(self, batch: Batch) -> dict[str, float]: ...

    def sft_update(self, trajectories: list[Trajectory]) -> dict[str, float]: ...

    def end_step(self) -> float:
        """Advance the learning-rate schedule by one training step; returns the new learning rate."""
        ...

    def weights_finite(self) -> bool: ...

    def weight_buckets(self, bucket_bytes: int) -> Iterator[WeightBucket | Any]:
        """The policy's full weights in buckets of about ``bucket_bytes``, one at a time: a dict of named CPU
        tensors, or a Ray reference to one (``ranks.TrainerGroup``). Consume it to the end: gathering a sharded
        model is a collective."""
        ...

    def save(self, path: Path) -> None: ...

    def load(self, path: Path) -> None: ...

    def export(self, out_dir: Path, dtype: str) -> None: ...

    def shutdown(self) -> None: ...


def merge_logprobs(results: list[list[torch.Tensor | None]], shares: list[RankShare]) -> list[torch.Tensor]:
    """Per trajectory of the whole batch, the log-probs its rank computed (fillers come back as None)."""
    out: list[torch.Tensor | None] = [None] * sum(len(s.indices) for s in shares)
    for values, share in zip(results, shares):
        for i, v in zip(share.indices, values):
            if v is not None:
                out[i] = v
    return out


def mean_metrics(results: list[dict[str, float]], per_token: tuple[str, ...]) -> dict[str, float]:
    """Sum the ranks' metric sums; per-token sums become means over the mini-batch's tokens."""
    total: dict[str, float] = {}
    for r in results:
        for k, v in r.items():
            total[k] = total.get(k, 0.0) + v
    tokens = max(total.get("tokens", 0.0), 1.0)
    return {k: (v / tokens if k in per_token else v) for k, v in total.items()}


class LocalTrainer:
    """The ``Trainer`` interface over one in-process ``PolicyTrainer`` (``policy``)."""

    def __init__(self, cfg: TrainerConfig, model_dir: str, objective: Objective, total_steps: int):
        self.cfg, self.model_dir = cfg, model_dir
        self.policy = PolicyTrainer.for_model(model_dir, cfg, objective, total_steps)

    def _share(self, batch: Batch) -> RankShare:
        return split_over_ranks(batch, 1, self.cfg.micro_batch_tokens)[0]

    def logprobs(self, trajectories: list[Trajectory], reference: bool = False) -> list[torch.Tensor]:
        share = self._share(Batch(trajectories))
        return merge_logprobs([self.policy.logprobs(share, reference)], [share])

    def grpo_update(self, batch: Batch) -> dict[str, float]:
        return mean_metrics([self.policy.grpo_update(self._share(batch))], GRPO_PER_TOKEN)

    def sft_update(self, trajectories: list[Trajectory]) -> dict[str, float]:
        return mean_metrics([self.policy.sft_update(self._share(Batch(trajectories)))], SFT_PER_TOKEN)

    def end_step(self) -> float:
        return self.policy.end_step()

    def weights_finite(self) -> bool:
        return self.policy.weights_finite()

    def weight_buckets(self, bucket_bytes: int) -> Iterator[WeightBucket]:
        return iter_buckets(self.policy.full_parameters(), bucket_bytes)

    def save(self, path: Path) -> None:
        self.policy.save(Path(path))

    def load(self, path: Path) -> None:
        self.policy.load(Path(path))

    def export(self, out_dir: Path, dtype: str, extra_files: dict[str, str] | None = None) -> None:
        write_hf_checkpoint(self.policy.full_parameters(), self.model_dir, out_dir, dtype, extra_files=extra_files)

    def shutdown(self) -> None:
        """Nothing to stop: the model goes with this object."""
