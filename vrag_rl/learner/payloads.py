"""The typed values the controller and the trainer ranks exchange.

Settings that hold for a whole run (``Objective``) reach the ranks once, at setup; each call then carries one
value: a ``Batch`` from the controller, a ``RankShare`` (a rank's part of it) to a rank. Weights leave the
learner as buckets of named tensors (``iter_buckets``), which the controller hands to the rollout engines.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.algo.config import AlgoConfig

MicroBatch = tuple[list[int], float]  # indices into a rank's trajectories, loss weight (0: collective filler)
WeightBucket = dict[str, torch.Tensor]  # named full tensors on the CPU, about ``bucket_bytes`` of them


@dataclass(frozen=True)
class Objective:
    """What the ranks optimise, fixed for the run and given once at setup."""

    algo: AlgoConfig | None = None
    """The GRPO loss: clip range, KL term, entropy bonus, aggregation. None: supervised steps only."""
    temperature: float = 1.0
    """Log-probs are those of the sampling distribution at this temperature (``sampling.logprob_temperature``)."""

    def __post_init__(self) -> None:
        if self.algo is not None and self.algo.loss_agg != "token-mean":
            raise NotImplementedError("the distributed trainer aggregates by token-mean only (algo.loss_agg)")

    @property
    def with_reference(self) -> bool:
        """Whether the ranks hold a frozen reference policy: only a KL term needs one."""
        return self.algo is not None and self.algo.kl_coef > 0


@dataclass
class Batch:
    """Trajectories, and what a GRPO update needs of each. An SFT step or a log-prob pass needs trajectories only."""

    trajectories: list[Trajectory]
    advantages: list[float] | None = None
    """Per trajectory, its group-relative advantage (GRPO updates)."""
    old_logprobs: list[torch.Tensor] | None = None
    """Per trajectory, the sampling policy's log-probs of its response tokens. None in a GRPO update: the
    update's own forward, detached (an on-policy step, ``algo.old_logprobs=update``)."""
    ref_logprobs: list[torch.Tensor] | None = None
    """Per trajectory, the reference policy's log-probs (GRPO with a KL term)."""
    is_weights: list[torch.Tensor] | None = None
    """Per trajectory, the importance weight of each response token (``algo.is_level``), None: all 1."""

    def take(self, indices: list[int]) -> Batch:
        """The trajectories at ``indices``, with their values."""

        def pick(values):
            return None if values is None else [values[i] for i in indices]

        return Batch(
            [self.trajectories[i] for i in indices],
            pick(self.advantages),
            pick(self.old_logprobs),
            pick(self.ref_logprobs),
            pick(self.is_weights),
        )

    @property
    def response_tokens(self) -> int:
        return sum(sum(t.response_mask) for t in self.trajectories)


@dataclass
class RankShare:
    """One rank's part of a batch."""

    batch: Batch
    """This rank's trajectories, each once, with their values."""
    plan: list[MicroBatch]
    """Micro-batches indexing into ``batch.trajectories``; every rank has as many (a forward is a collective)."""
    indices: list[int] = field(default_factory=list)
    """Each trajectory's index in the whole batch."""
    num_tokens: int = 0
    """Response tokens of the whole batch over all ranks: every micro-batch's loss is divided by it."""


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[WeightBucket]:
    """Group (name, tensor) pairs into dicts of about ``bucket_bytes`` each (a tensor is never split; one
    larger than the bucket makes a bucket of its own), in order."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: WeightBucket = {}
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = tensor
        size += nbytes
    if bucket:
        yield bucket
