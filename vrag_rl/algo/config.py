"""Settings of the GRPO objective and of how a step's rollouts are split into updates."""

from __future__ import annotations

from dataclasses import dataclass

from vrag_rl.algo.correction import Correction
from vrag_rl.algo.losses import AGG_MODES

ADVANTAGES = ("grpo", "rloo")
OLD_LOGPROBS = ("recompute", "rollout", "update")
KL_KINDS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")  # see losses.kl_penalty


@dataclass
class AlgoConfig:
    prompts_per_step: int = 32
    group_size: int = 5  # rollouts per prompt (GRPO's n)
    advantage: str = "grpo"  # "grpo" | "rloo"
    norm_by_std: bool = True  # False: Dr. GRPO (mean-centred only)
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip_c: float | None = 3.0
    kl_coef: float = 0.01  # KL-to-reference loss weight; 0 drops the reference policy altogether
    kl_kind: str = "low_var_kl"
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    epochs: int = 1  # passes over a step's rollouts
    mini_batches: int = 1  # optimizer steps per pass
    # "recompute": the trainer's own forward before the update (exact ratios); "rollout": the engine's sampled
    # log-probs (one forward less; off by the engine's numerical difference, large in bf16); "update": the
    # update's own forward, detached (one forward less, exact: on-policy steps only, one epoch, one mini-batch).
    old_logprobs: str = "recompute"
    # Off-policy correction (algo/correction.py): importance weights pi_proximal / pi_engine per token or per
    # trajectory ("off" | "token" | "sequence"), truncated at is_cap ("truncate") or set to 0 outside
    # [is_floor, is_cap] ("mask"). Needs old_logprobs=recompute: the proximal policy is the trainer's pass.
    is_level: str = "off"
    is_mode: str = "truncate"
    is_cap: float = 2.0
    is_floor: float = 0.0
    # Rollouts of the next steps are sampled while the trainer updates, by weights at most this many versions
    # (steps) behind the trainer's (job/lookahead.py); 0: every step samples with the newest weights.
    max_staleness: int = 0

    def __post_init__(self) -> None:
        checks = {
            "algo.advantage": (self.advantage in ADVANTAGES, f"one of {ADVANTAGES}"),
            "algo.loss_agg": (self.loss_agg in AGG_MODES, f"one of {AGG_MODES}"),
            "algo.old_logprobs": (self.old_logprobs in OLD_LOGPROBS, f"one of {OLD_LOGPROBS}"),
            "algo.prompts_per_step": (self.prompts_per_step >= 1, ">= 1"),
            "algo.group_size": (self.group_size >= 1, ">= 1"),
            "algo.epochs": (self.epochs >= 1, ">= 1"),
            "algo.mini_batches": (1 <= self.mini_batches <= self.prompts_per_step, "in 1..prompts_per_step"),
            "algo.clip_low": (0 < self.clip_low < 1, "in (0, 1)"),
            "algo.clip_high": (self.clip_high > 0, "> 0"),
            "algo.kl_coef": (self.kl_coef >= 0, ">= 0"),
            "algo.entropy_coef": (self.entropy_coef >= 0, ">= 0"),
            "algo.max_staleness": (self.max_staleness >= 0, ">= 0"),
        }
        for key, (ok, want) in checks.items():
            if not ok:
                raise ValueError(f"{key} must be {want}, got {getattr(self, key.split('.')[1])!r}")
        if self.correction.on and self.old_logprobs != "recompute":
            raise ValueError("algo.is_level needs algo.old_logprobs=recompute: its pass is the proximal policy")
        if self.max_staleness and self.old_logprobs == "update":
            raise ValueError("algo.max_staleness > 0 needs old_logprobs recompute or rollout: older weights sampled")
        if self.old_logprobs == "update" and (self.epochs, self.mini_batches) != (1, 1):
            raise ValueError("algo.old_logprobs=update needs an on-policy step: algo.epochs=1, algo.mini_batches=1")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"algo.dual_clip_c must be > 1 or null, got {self.dual_clip_c}")
        if self.kl_kind.removesuffix("+") not in KL_KINDS:
            raise ValueError(
                f"algo.kl_kind must be one of {KL_KINDS} (optionally with a trailing +), got {self.kl_kind!r}"
            )

    @property
    def correction(self) -> Correction:
        """The importance weighting the ``is_*`` settings describe (validated on construction)."""
        return Correction(self.is_level, self.is_mode, self.is_cap, self.is_floor)
