"""Off-policy correction: importance weights from the policy that sampled to the one being corrected towards,
and the measured gap between the two.

Three policies meet in an update (docs/training.md, "Off-policy correction"):

* the *behaviour* policy: the rollout engine's weights and numerics, whose sampled log-probs each trajectory
  records (``Trajectory.sampled_logprobs``);
* the *proximal* policy: the trainer's weights before the step's first update, read by its own forward
  (``algo.old_logprobs=recompute``); the PPO clip is taken against it;
* the policy being updated.

Even on-policy the first two differ, by the engine's numerics (bf16 kernels, other reductions); once rollouts
run ahead of the trainer, also by the versions in between. ``importance_weights`` gives per token the weight
pi_proximal / pi_behaviour that turns the behaviour's samples into the proximal policy's expectation:

* ``level``: "token" (one ratio per token: biased, low variance) or "sequence" (the product over the
  trajectory's response tokens, broadcast to each: unbiased, high variance);
* ``mode``: "truncate" caps a weight at ``cap`` (truncated IS, TIS); "mask" sets a weight outside
  ``[floor, cap]`` to 0 (masked IS; with level "token" and floor 0 this is AReaL's decoupled PPO with
  ``behav_imp_weight_cap``; with a floor, verl's IcePop threshold "floor_cap").

Weights multiply the clipped per-token policy loss (``losses.policy_loss``) and carry no gradient. The
conventions (log-ratios clamped to +-20 before ``exp``, masked positions weighted 0) are verl 0.9.1's
``rollout_corr_helper``, the test oracle.

``mismatch_metrics`` measures the engine-trainer gap per token and per turn (a turn is one assistant reply,
a maximal run of response tokens): the mean and max |log pi_trainer - log pi_engine|, and a KL estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IS_LEVELS = ("off", "token", "sequence")
IS_MODES = ("truncate", "mask")
SAFETY_BOUND = 20.0  # |log-ratio| is clamped to this before exp: exp(20) ~ 4.9e8


@dataclass(frozen=True)
class Correction:
    """How behaviour samples are reweighted towards the proximal policy (``AlgoConfig``'s ``is_*`` settings)."""

    level: str = "off"
    mode: str = "truncate"
    cap: float = 2.0
    floor: float = 0.0

    def __post_init__(self) -> None:
        if self.level not in IS_LEVELS or self.mode not in IS_MODES:
            raise ValueError(f"algo.is_level must be one of {IS_LEVELS} and algo.is_mode one of {IS_MODES}")
        if not 0 <= self.floor < self.cap:
            raise ValueError(f"algo.is_floor and algo.is_cap need 0 <= floor < cap, got {self.floor}, {self.cap}")
        if self.floor > 0 and self.mode != "mask":
            raise ValueError("algo.is_floor applies to is_mode=mask only (a truncated weight has no floor)")

    @property
    def on(self) -> bool:
        return self.level != "off"


def importance_weights(
    proximal: Tensor, behaviour: Tensor, mask: Tensor, correction: Correction
) -> tuple[Tensor, dict[str, float]]:
    """Per-token weights ``[N, L]`` (0 on masked positions, detached) and their metrics: "is_mean", "is_max",
    "is_ess" (effective sample size over valid tokens as a fraction: (sum w)^2 / (n sum w^2), 1 when all
    weights are equal) and "is_cut" (the share of valid tokens whose weight was truncated or masked).

    ``proximal``, ``behaviour`` and ``mask`` are ``[N, L]``: N trajectories' response tokens, padded."""
    if not correction.on:
        raise ValueError("importance_weights needs algo.is_level token or sequence")
    keep = mask.bool()
    log_ratio = torch.where(keep, proximal - behaviour, 0.0)
    if correction.level == "sequence":
        log_ratio = log_ratio.sum(dim=-1, keepdim=True).expand_as(log_ratio)
    raw = torch.where(keep, log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp(), 0.0)
    if correction.mode == "truncate":
        cut = raw > correction.cap
        weights = raw.clamp(max=correction.cap)
    else:
        cut = (raw > correction.cap) | (raw < correction.floor)
        weights = torch.where(cut, 0.0, raw)
    weights = weights.detach()
    valid = weights[keep]
    n = max(valid.numel(), 1)
    total = valid.sum()
    metrics = {
        "is_mean": float(total / n),
        "is_max": float(valid.max()) if valid.numel() else 0.0,
        "is_ess": float(total.square() / (n * valid.square().sum())) if total > 0 else 0.0,
        "is_cut": float((cut & keep).sum() / n),
    }
    return weights, metrics


def trajectory_weights(
    proximal: list[Tensor], behaviour: list[Tensor], correction: Correction
) -> tuple[list[Tensor], dict[str, float]]:
    """``importance_weights`` on per-trajectory vectors of response-token log-probs: the weights as vectors."""
    padded = [torch.nn.utils.rnn.pad_sequence(v, batch_first=True) for v in (list(proximal), list(behaviour))]
    lengths = torch.tensor([len(v) for v in proximal])
    mask = torch.arange(padded[0].shape[1])[None, :] < lengths[:, None]
    weights, metrics = importance_weights(padded[0], padded[1], mask, correction)
    return [row[:n] for row, n in zip(weights, lengths.tolist())], metrics


def mismatch_metrics(trainer: list[Tensor], engine: list[Tensor], turn_lengths: list[list[int]]) -> dict[str, float]:
    """The trainer-engine log-prob gap, over a batch of trajectories.

    Per trajectory: the trainer's and the engine's log-probs of its response tokens (in order) and the lengths
    of its turns (they add up to the token count). Token level: mean and max |delta| with delta = trainer -
    engine, and the k3 estimate of KL(engine || trainer), mean of exp(delta) - delta - 1 (verl's "k3_kl").
    Turn level (delta summed over a turn is the log-ratio of the whole reply): mean and max |delta|, and the
    k1 estimate of KL(engine || trainer) per turn, the mean of -delta."""
    deltas = [t.double() - e.double() for t, e in zip(trainer, engine)]
    if not any(d.numel() for d in deltas):
        return {}
    tokens = torch.cat(deltas)
    turns = torch.stack([part.sum() for d, n in zip(deltas, turn_lengths) for part in d.split(n) if len(part)])
    safe = tokens.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    return {
        "token_abs_mean": float(tokens.abs().mean()),
        "token_abs_max": float(tokens.abs().max()),
        "token_kl_k3": float((safe.exp() - safe - 1).mean()),
        "turn_abs_mean": float(turns.abs().mean()),
        "turn_abs_max": float(turns.abs().max()),
        "turn_kl_k1": float((-turns).mean()),
    }
