"""Aggregation, KL penalties, the clipped policy loss and entropy: hand-computed values and edge cases."""

import math

import pytest
import torch

from vrag_rl.algo.losses import AGG_MODES, aggregate, entropy_from_logits, kl_penalty, masked_mean, policy_loss

VALUES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_aggregate_hand_computed():
    # Exact: averages divide by the true counts (no epsilon in the denominators).
    assert aggregate(VALUES, MASK, "token-mean").item() == (1 + 2 + 3 + 10) / 4
    assert aggregate(VALUES, MASK, "seq-mean-token-sum").item() == (6 + 10) / 2
    assert aggregate(VALUES, MASK, "seq-mean-token-mean").item() == (2 + 10) / 2
    with pytest.raises(ValueError):
        aggregate(VALUES, MASK, "token-sum")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_ignores_nan_off_mask_and_gives_zero_gradient_there(mode):
    values = VALUES.clone()
    values[MASK == 0] = float("nan")
    values[0, 3] = float("inf")
    values.requires_grad_(True)
    loss = aggregate(values, MASK, mode)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(loss.detach(), aggregate(VALUES, MASK, mode))
    assert values.grad[MASK == 0].eq(0).all() and values.grad[MASK == 1].ne(0).all()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_all_masked_batch_aggregates_to_zero(mode):
    values = torch.randn(3, 5, requires_grad=True)
    loss = aggregate(values, torch.zeros(3, 5), mode)
    loss.backward()
    assert loss.item() == 0 and values.grad.eq(0).all()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_with_global_count_accumulate_to_whole_batch(mode):
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    mask = (torch.rand(12, 6, generator=gen) < 0.6).long()
    mask[3] = 0
    count = mask.sum() if mode == "token-mean" else (mask.sum(-1) > 0).sum()
    parts = sum(aggregate(values[i : i + 4], mask[i : i + 4], mode, global_count=count) for i in range(0, 12, 4))
    torch.testing.assert_close(parts, aggregate(values, mask, mode))
    # Split over ranks instead: the ranks' parts add up to the whole batch's loss too.
    ranks = [aggregate(values[i : i + 6], mask[i : i + 6], mode, global_count=count) for i in (0, 6)]
    torch.testing.assert_close(sum(ranks), aggregate(values, mask, mode))


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    ref = torch.tensor([-1.0, -1.0, -1.5, -30.0], dtype=torch.float64)
    d = logp - ref
    assert torch.equal(kl_penalty(logp, ref, "k1"), d)
    assert torch.equal(kl_penalty(logp, ref, "abs"), d.abs())
    assert torch.equal(kl_penalty(logp, ref, "mse"), 0.5 * d**2)
    k3 = kl_penalty(logp, ref, "k3")
    assert k3[0] == 0 and (k3 >= 0).all()
    assert k3[1].item() == pytest.approx(math.exp(1) - 1 - 1)
    assert k3[3] == 10  # exp(-27) + 27 - 1 = 26, clamped
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_k3_is_clamped_to_ten_and_straight_through_has_k2_gradient():
    logp = torch.tensor([-0.5, -3.0, -10.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -30.0, -1.0], dtype=torch.float64)
    k3 = kl_penalty(logp, ref, "k3")
    assert k3[1] == 10 and k3[2] == 10  # log-ratio 27 and -9: both estimates exceed the clamp
    value = kl_penalty(logp, ref, "k3+")
    torch.testing.assert_close(value, k3)
    value.sum().backward()
    torch.testing.assert_close(logp.grad, (logp - ref).detach())  # d/dlogp of (logp - ref)^2 / 2


def masked_inputs():
    """Off-mask garbage: a NaN advantage on a finite log-prob, NaN and -inf log-probs."""
    nan, inf = float("nan"), float("inf")
    logp = torch.tensor([[-1.0, -2.0, -0.7, nan], [-0.5, -inf, -1.0, -3.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.7, -1.0], [-0.5, -inf, -1.0, -3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]])
    adv = torch.tensor([[1.0, 1.0, nan, 1.0], [-2.0, -2.0, -2.0, inf]], dtype=torch.float64)
    return logp, old, adv, mask


@pytest.mark.parametrize("agg", AGG_MODES)
def test_on_policy_loss_is_policy_gradient_and_only_unmasked_tokens_get_gradient(agg):
    logp, old, adv, mask = masked_inputs()
    logp.requires_grad_(True)
    loss, metrics = policy_loss(logp, old, adv, mask, agg=agg)
    loss.backward()
    # ratio 1 on every valid token: loss = -A aggregated, d loss / d logp = -A * aggregation weight.
    plain = -torch.where(mask.bool(), adv, 0.0)
    assert loss.item() == pytest.approx(aggregate(plain, mask, agg).item())
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[mask == 0].eq(0).all() and logp.grad[mask == 1].ne(0).all()
    weights = {"token-mean": 1 / 4, "seq-mean-token-sum": 1 / 2}.get(agg)
    if weights is not None:
        torch.testing.assert_close(logp.grad[mask == 1], plain[mask == 1] * weights)
    assert metrics["pg_clipfrac"] == 0 and metrics["pg_clipfrac_lower"] == 0 and metrics["ppo_kl"] == 0


def test_asymmetric_clip():
    old = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    # ratio 1.25 on both tokens: inside (0.8, 1.28), above (0.8, 1.2).
    logp = torch.full((1, 2), math.log(1.25), dtype=torch.float64, requires_grad=True)
    loss, metrics = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.25 + 1.25) / 2) and metrics["pg_clipfrac"] == 0
    loss, metrics = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    # A > 0 clipped at 1.2 (no gradient); A < 0 keeps the larger unclipped loss 1.25.
    assert loss.item() == pytest.approx((-1.2 + 1.25) / 2) and metrics["pg_clipfrac"] == 0.5
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] > 0
    # ratio 0.5 with A < 0: clipped at 1 - clip_low = 0.8 since -A * 0.8 > -A * 0.5.
    half = torch.full((1, 1), math.log(0.5))
    loss, metrics = policy_loss(half, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), clip_low=0.2)
    assert loss.item() == pytest.approx(0.8) and metrics["pg_clipfrac"] == 1


def test_dual_clip_caps_negative_advantage_loss():
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[math.log(5.0), math.log(5.0), math.log(2.0)]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[-2.0, 2.0, -2.0]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    loss, metrics = policy_loss(logp, old, adv, mask, dual_clip_c=3.0, agg="seq-mean-token-sum")
    loss.backward()
    # token 0: -A * 5 = 10 capped at 3 * |A| = 6; token 1: clipped at 1.2 -> -2.4; token 2: 4 < 6 stays.
    assert loss.item() == pytest.approx(6 - 2.4 + 4)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(1 / 3)
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == 0 and logp.grad[0, 2] != 0
    uncapped, metrics = policy_loss(logp, old, adv, mask, dual_clip_c=None, agg="seq-mean-token-sum")
    assert uncapped.item() == pytest.approx(10 - 2.4 + 4) and metrics["pg_clipfrac_lower"] == 0
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, dual_clip_c=1.0)


def test_log_ratio_clamp_keeps_loss_finite_and_ppo_kl_is_k1_of_old_vs_new():
    logp = torch.tensor([[-1.0, 50.0, -0.2]], dtype=torch.float64)
    old = torch.tensor([[-1.5, -1.0, -0.1]], dtype=torch.float64)
    loss, metrics = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 3), dual_clip_c=None)
    assert loss.item() == pytest.approx((math.exp(0.5) + math.exp(20) + math.exp(-0.1)) / 3)  # 51 clamped to 20
    assert metrics["ppo_kl"].item() == pytest.approx((-0.5 - 20 + 0.1) / 3)
    assert masked_mean(torch.tensor([1.0, 5.0]), torch.tensor([0, 0])).item() == 0


def test_entropy_from_logits():
    logits = torch.randn(3, 7, 11, dtype=torch.float64)
    torch.testing.assert_close(entropy_from_logits(logits), torch.distributions.Categorical(logits=logits).entropy())
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 16)), torch.full((2,), math.log(16)))
    huge = torch.tensor([[1e4, 0.0, -1e4]], requires_grad=True)  # naive softmax then log would give nan/inf
    entropy_from_logits(huge).sum().backward()
    assert entropy_from_logits(huge).item() == 0 and torch.isfinite(huge.grad).all()
    banned = torch.tensor([[0.0, 0.0, float("-inf")]], requires_grad=True)
    value = entropy_from_logits(banned)
    value.sum().backward()
    assert value.item() == pytest.approx(math.log(2)) and torch.isfinite(banned.grad).all()
