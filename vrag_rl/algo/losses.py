"""Token-level losses for policy-gradient training: aggregation, KL penalties, the clipped PPO objective, entropy.

Shapes: ``[N, L]`` per-token tensors (N sequences, L response positions) with a ``mask`` that is 1 on
model-generated tokens and 0 elsewhere. Masked positions never reach the result, even when they hold
inf/NaN (the log-probs of padding are arbitrary), and get zero gradient.

Conventions follow verl 0.9.1 (the test oracle), with these documented differences:

* Averages divide by the exact count. verl adds 1e-8 to the token count of each row in
  "seq-mean-token-mean" and to the denominator of the clip-fraction / approx-KL metrics, which shifts
  those values by a relative ~1e-8.
* An all-masked batch aggregates to 0 (zero gradient) where verl returns NaN (0/0). Fully masked rows
  inside a batch are excluded from the sequence modes, as in verl.
"""

from typing import Literal, get_args

import torch
from torch import Tensor

AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
AGG_MODES: tuple[str, ...] = get_args(AggMode)

# log pi - log pi_old is clamped before exp: one extreme token must not overflow the ratio to inf.
LOG_RATIO_CLAMP = 20.0
# k3 KL: the log-ratio is clamped before exp, the per-token estimate after it (same bounds as verl).
K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is set; 0 if none is."""
    keep = mask.bool()
    return torch.where(keep, values, 0.0).sum() / keep.sum().clamp_min(1)


def aggregate(values: Tensor, mask: Tensor, mode: AggMode, global_count: float | Tensor | None = None) -> Tensor:
    """Reduce a per-token loss ``[N, L]`` to a scalar.

    * "token-mean": sum over valid tokens / number of valid tokens (long answers weigh more).
    * "seq-mean-token-sum": per-sequence token sums, averaged over sequences with any valid token.
    * "seq-mean-token-mean": per-sequence token means, averaged over sequences with any valid token.

    When a batch is split into parts (micro-batches, data-parallel ranks), pass ``global_count``: the number
    of valid tokens ("token-mean") or of non-empty sequences (seq modes) in the whole batch. Each part then
    contributes ``sum / global_count`` and the parts add up to the whole batch's loss. How gradients are
    combined across ranks (averaged, so the trainer scales by the world size) is the trainer's business.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGG_MODES}")
    keep = mask.bool()
    token_values = torch.where(keep, values, 0.0)
    if mode == "token-mean":
        total = token_values.sum()
        local_count = keep.sum()
    else:
        row_tokens = keep.sum(dim=-1)
        row_values = token_values.sum(dim=-1)
        if mode == "seq-mean-token-mean":
            row_values = row_values / row_tokens.clamp_min(1)
        total = row_values.sum()  # empty rows contribute 0
        local_count = (row_tokens > 0).sum()
    count = local_count.clamp_min(1) if global_count is None else global_count
    return total / count


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs (Schulman's k1/k2/k3).

    kinds: "k1"/"kl": logp - ref; "abs": |logp - ref|; "k2"/"mse": (logp - ref)^2 / 2;
    "k3"/"low_var_kl": exp(ref - logp) - (ref - logp) - 1 (non-negative, low variance), with the
    log-ratio clamped to [-20, 20] and the result to [-10, 10].

    A trailing "+" (e.g. "k3+") keeps the value of the named estimator but takes the gradient of k2,
    whose gradient is the unbiased one for the KL itself; "k2+"/"mse+" are plain k2.
    """
    straight_through = kind.endswith("+")
    base = kind.removesuffix("+")
    diff = logp - ref_logp
    if base in ("k1", "kl"):
        value = diff
    elif base == "abs":
        value = diff.abs()
    elif base in ("k2", "mse"):
        return 0.5 * diff.square()
    elif base in ("k3", "low_var_kl"):
        log_ratio = (-diff).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        value = (log_ratio.exp() - log_ratio - 1).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)
    else:
        raise ValueError(f"unknown KL penalty {kind!r}")
    if not straight_through:
        return value
    k2 = 0.5 * diff.square()
    return k2 - k2.detach() + value.detach()


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = 3.0,
    agg: AggMode = "token-mean",
    global_count: float | Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss with asymmetric clip range and dual clip, aggregated by ``agg``.

    Per token, with ratio rho = pi / pi_old and advantage A:
        loss = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))
    and for A < 0, dual clip (Ye et al. 2019) caps it at c * |A|, so a token whose ratio exploded
    cannot dominate the batch. ``dual_clip_c=None`` disables the cap.
    ``advantages`` is ``[N, L]`` or per-sequence ``[N]``. ``weights`` (``[N, L]``, no gradient) multiply the
    per-token loss after clipping: off-policy importance weights (``algo/correction.py``).

    Metrics (detached scalars, means over valid tokens): "pg_clipfrac" (share where the clipped term
    was taken), "pg_clipfrac_lower" (share capped by dual clip), "ppo_kl" (k1 estimate of
    KL(pi_old || pi), i.e. mean of old_logp - logp).
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    # Zeroing masked inputs first keeps inf/NaN there (log-probs of padding) out of the gradient too.
    keep = mask.bool()
    log_ratio = (torch.where(keep, logp, 0.0) - torch.where(keep, old_logp, 0.0)).clamp(
        -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
    )
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    token_loss = torch.maximum(unclipped, clipped)
    clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
    if dual_clip_c is None:
        lower_clipfrac = torch.zeros((), dtype=logp.dtype, device=logp.device)
    else:
        cap = -advantages * dual_clip_c
        negative = advantages < 0
        lower_clipfrac = masked_mean((negative & (token_loss > cap)).to(logp.dtype), mask)
        token_loss = torch.where(negative, torch.minimum(token_loss, cap), token_loss)
    if weights is not None:
        token_loss = token_loss * weights.detach()
    loss = aggregate(token_loss, mask, agg, global_count=global_count)
    metrics = {
        "pg_clipfrac": clipfrac.detach(),
        "pg_clipfrac_lower": lower_clipfrac.detach(),
        "ppo_kl": masked_mean(-log_ratio, mask).detach(),
    }
    return loss, metrics


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension, computed in log space.

    -sum p log p with log p = logits - logsumexp(logits); -inf logits (banned tokens) contribute 0
    to the value and no NaN to the gradient.
    """
    log_p = logits - logits.logsumexp(dim=-1, keepdim=True)
    p = log_p.exp()
    safe_log_p = torch.where(p > 0, log_p, 0.0)
    return -(p * safe_log_p).sum(dim=-1)
