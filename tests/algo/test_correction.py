"""Off-policy correction against verl 0.9.1 (the oracle): importance weights and their metrics
(``rollout_corr_helper``), the weighted policy loss (``core_algos.compute_policy_loss_vanilla`` with
``rollout_is_weights``) and the token-level mismatch KL (``compute_offpolicy_metrics``)."""

import pytest
import torch
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.rollout_corr_helper import compute_offpolicy_metrics, compute_rollout_correction_weights

import vrag_rl  # noqa: F401  (first: lets verl import torchvision on CPU torch)
from tests.algo.test_parity_verl import actor_config, policy_inputs, random_mask, tol
from vrag_rl.algo.config import AlgoConfig
from vrag_rl.algo.correction import Correction, importance_weights, mismatch_metrics, trajectory_weights
from vrag_rl.algo.losses import policy_loss

# (mode, floor, cap) and verl's threshold for it: a single number truncates, "lower_upper" masks (IcePop).
# verl needs a positive lower bound; 1e-30 lies below any exp(-20)-clamped weight, so it is our floor 0.
MODES = [("truncate", 0.0, 2.0, 2.0), ("mask", 0.0, 3.0, "1e-30_3.0"), ("mask", 0.5, 2.0, "0.5_2.0")]


def logprob_pair(gen: torch.Generator, n: int, length: int, dtype: torch.dtype, scale: float):
    """Behaviour and proximal log-probs with junk on masked positions (it must not reach any result)."""
    mask = random_mask(gen, n, length)
    behaviour = -3 * torch.rand(n, length, generator=gen, dtype=torch.float64)
    proximal = behaviour + scale * torch.randn(n, length, generator=gen, dtype=torch.float64)
    proximal[-1, :2] = behaviour[-1, :2] + torch.tensor([30.0, -30.0], dtype=torch.float64)  # past the clamp
    junk = torch.full_like(proximal, 1e3)
    proximal = torch.where(mask.bool(), proximal, junk)
    return proximal.to(dtype), behaviour.to(dtype), mask.to(dtype)


@pytest.mark.parametrize("level,scale", [("token", 0.5), ("sequence", 0.4)])
@pytest.mark.parametrize("mode,floor,cap,threshold", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_importance_weights_match_verl(level, scale, mode, floor, cap, threshold, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    proximal, behaviour, mask = logprob_pair(gen, 24, 16, dtype, scale)
    weights, metrics = importance_weights(proximal, behaviour, mask, Correction(level, mode, cap, floor))
    # verl reads the log-ratio on every position and multiplies padding by the mask afterwards.
    log_ratio = torch.where(mask.bool(), proximal - behaviour, 0.0)
    expected, verl = compute_rollout_correction_weights(log_ratio, mask, level, threshold)
    torch.testing.assert_close(weights, expected.to(dtype), **tol(dtype))
    assert not weights.requires_grad and torch.all(weights[~mask.bool()] == 0)
    assert metrics["is_mean"] == pytest.approx(verl["rollout_is_mean"], rel=1e-6)
    assert metrics["is_ess"] == pytest.approx(verl["rollout_is_eff_sample_size"], rel=1e-5)
    if level == "token":  # verl's sequence-level max is of the weights before truncation
        assert metrics["is_max"] == pytest.approx(verl["rollout_is_max"], rel=1e-6)
    assert 0 < metrics["is_cut"] < 1  # some weights were cut, most kept


def test_weights_of_one_per_trajectory_and_the_settings_checks():
    """Equal policies weigh every token 1; vectors of different lengths come back at their lengths."""
    same = [torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-0.1])]
    for level in ("token", "sequence"):
        weights, metrics = trajectory_weights(same, same, Correction(level))
        assert [w.tolist() for w in weights] == [[1.0, 1.0, 1.0], [1.0]]
        assert metrics == {"is_mean": 1.0, "is_max": 1.0, "is_ess": 1.0, "is_cut": 0.0}
    shifted = [same[0] + torch.tensor([0.0, 0.0, 5.0]), same[1] - 5]  # one token 148x likelier, one 148x less
    weights, _ = trajectory_weights(shifted, same, Correction("token", "mask", cap=2.0, floor=0.1))
    assert [w.tolist() for w in weights] == [[1.0, 1.0, 0.0], [0.0]]
    (seq, _), _ = trajectory_weights(shifted, same, Correction("sequence", "truncate", cap=2.0))
    assert seq.tolist() == [2.0, 2.0, 2.0]  # the product of the trajectory's ratios, truncated
    with pytest.raises(ValueError, match="is_level"):
        AlgoConfig(is_level="turn")
    with pytest.raises(ValueError, match="floor < cap"):
        AlgoConfig(is_level="token", is_cap=0.5, is_floor=0.5)
    with pytest.raises(ValueError, match="is_mode=mask only"):
        AlgoConfig(is_level="token", is_floor=0.1)
    with pytest.raises(ValueError, match="old_logprobs=recompute"):
        AlgoConfig(is_level="token", old_logprobs="rollout")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_weighted_policy_loss_matches_verl(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    logp, old, adv, mask = policy_inputs(gen, 24, 16, dtype)
    behaviour = old + 0.5 * torch.randn(old.shape, generator=gen, dtype=torch.float64).to(dtype)
    weights, _ = importance_weights(old, behaviour, mask, Correction("token", "truncate", 2.0))
    ours_logp = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(ours_logp, old, adv, mask, clip_high=0.28, weights=weights)
    loss.backward()
    verl_logp = logp.clone().requires_grad_(True)
    config = actor_config(0.2, 0.28, 3.0, "token-mean")
    expected, _ = core_algos.compute_policy_loss_vanilla(
        old, verl_logp, adv, mask, "token-mean", config, rollout_is_weights=weights
    )
    expected.backward()
    torch.testing.assert_close(loss, expected, **tol(dtype))
    torch.testing.assert_close(ours_logp.grad, verl_logp.grad, **tol(dtype))
    unweighted, _ = policy_loss(logp, old, adv, mask, clip_high=0.28)
    assert not torch.isclose(loss, unweighted)  # the weights changed the loss


def test_mismatch_per_token_matches_verl_and_per_turn_sums_each_reply():
    gen = torch.Generator().manual_seed(3)
    engine = [-2 * torch.rand(n, generator=gen, dtype=torch.float64) for n in (7, 5, 9)]
    trainer = [e + 0.1 * torch.randn(len(e), generator=gen, dtype=torch.float64) for e in engine]
    turns = [[3, 4], [5], [2, 0, 7]]  # an empty turn (the engine failed it) is no turn
    got = mismatch_metrics(trainer, engine, turns)

    padded = [torch.nn.utils.rnn.pad_sequence(v, batch_first=True) for v in (trainer, engine)]
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(e)) for e in engine], batch_first=True)
    verl = compute_offpolicy_metrics(padded[0], padded[1], mask)
    assert got["token_kl_k3"] == pytest.approx(verl["k3_kl"], rel=1e-9)
    deltas = torch.cat([t - e for t, e in zip(trainer, engine)])
    assert got["token_abs_mean"] == pytest.approx(float(deltas.abs().mean()))
    assert got["token_abs_max"] == pytest.approx(float(deltas.abs().max()))
    d = [t - e for t, e in zip(trainer, engine)]
    per_turn = [d[0][:3].sum(), d[0][3:].sum(), d[1].sum(), d[2][:2].sum(), d[2][2:].sum()]
    assert got["turn_abs_mean"] == pytest.approx(float(torch.stack(per_turn).abs().mean()))
    assert got["turn_abs_max"] == pytest.approx(float(torch.stack(per_turn).abs().max()))
    assert got["turn_kl_k1"] == pytest.approx(float(-torch.stack(per_turn).mean()))
    assert mismatch_metrics([torch.zeros(0)], [torch.zeros(0)], [[]]) == {}
