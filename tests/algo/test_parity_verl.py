"""Parity of vrag_rl.algo with verl 0.9.1's core_algos (the oracle) on random batches.

Inputs cover several seeds, shapes and dtypes, shuffled group layouts with groups of one, groups with
identical rewards, rows with gaps in the mask (multi-turn) and fully masked rows.
"""

import numpy as np
import pytest
import torch
from verl.trainer.ppo import core_algos
from verl.utils import torch_functional as verl_F
from verl.workers.config import ActorConfig

import vrag_rl  # noqa: F401  (first: lets verl import torchvision on CPU torch)
from vrag_rl.algo.advantages import broadcast_to_tokens, grpo_advantages, rloo_advantages
from vrag_rl.algo.losses import AGG_MODES, aggregate, entropy_from_logits, kl_penalty, policy_loss

SEEDS = [0, 1, 2, 3]
DTYPES = [torch.float64, torch.float32]
# (n_groups, max_group_size, response_length)
SHAPES = [(1, 5, 3), (6, 5, 7), (16, 8, 32)]


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}


def random_mask(gen: torch.Generator, n: int, length: int) -> torch.Tensor:
    """Response masks: left-aligned responses of random length (some empty), some rows with gaps."""
    lengths = torch.randint(0, length + 1, (n,), generator=gen)
    lengths[0] = 0  # always at least one fully masked row
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    gaps = torch.rand(n, length, generator=gen) < 0.2  # observation tokens inside a multi-turn response
    with_gaps = torch.rand(n, 1, generator=gen) < 0.5
    mask = mask * ~(gaps & with_gaps)
    mask[-1] = 1  # always at least one fully valid row
    return mask


def random_groups(gen: torch.Generator, n_groups: int, max_size: int, dtype: torch.dtype):
    """Shuffled uid strings (as verl receives them) with sizes 1..max_size, and rewards per sample."""
    sizes = torch.randint(1, max_size + 1, (n_groups,), generator=gen)
    sizes[0] = 1  # a group of one
    if n_groups > 1:
        sizes[1] = max(int(sizes[1]), 2)
    uids, rewards = [], []
    for g, size in enumerate(sizes.tolist()):
        uids += [f"uid-{g}"] * size
        kind = g % 4
        if kind == 0:  # continuous rewards
            rewards.append(torch.rand(size, generator=gen, dtype=torch.float64) * 2 - 0.5)
        elif kind == 1:  # binary answer rewards
            rewards.append(torch.randint(0, 2, (size,), generator=gen).double())
        elif kind == 2:  # all equal (exactly representable, so the oracle's mean is exact too)
            rewards.append(torch.full((size,), float(torch.randint(0, 3, (1,), generator=gen)) / 2))
        else:  # weighted mix like 0.2 ndcg + 0.7 answer + 0.1 format
            ndcg = torch.rand(size, generator=gen, dtype=torch.float64)
            answer = torch.randint(0, 2, (size,), generator=gen).double()
            rewards.append(0.2 * ndcg + 0.7 * answer + 0.1)
    perm = torch.randperm(len(uids), generator=gen)
    return np.array(uids, dtype=object)[perm.numpy()], torch.cat(rewards)[perm].to(dtype)


def token_level(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outcome reward on the last response token (position 0 for an empty response)."""
    positions = torch.arange(mask.shape[1])
    last = torch.where(mask.bool(), positions, 0).amax(dim=1)
    out = torch.zeros(mask.shape, dtype=rewards.dtype)
    out[torch.arange(len(rewards)), last] = rewards
    return out


def cases():
    for seed in SEEDS:
        for dtype in DTYPES:
            for shape in SHAPES:
                yield pytest.param(seed, dtype, shape, id=f"s{seed}-{str(dtype)[6:]}-{shape[0]}x{shape[1]}x{shape[2]}")


@pytest.mark.parametrize("seed,dtype,shape", list(cases()))
def test_outcome_advantages_match_verl(seed, dtype, shape):
    gen = torch.Generator().manual_seed(seed)
    uids, rewards = random_groups(gen, shape[0], shape[1], dtype)
    mask = random_mask(gen, len(rewards), shape[2]).to(dtype)
    scores = token_level(rewards, mask)
    alone = torch.tensor([list(uids).count(u) == 1 for u in uids])
    for norm in (True, False):
        expected, _ = core_algos.compute_grpo_outcome_advantage(
            scores.clone(), mask, uids, norm_adv_by_std_in_grpo=norm
        )
        ours = broadcast_to_tokens(grpo_advantages(rewards, list(uids), norm_by_std=norm), mask)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours[~alone], expected[~alone], **tol(dtype))
        # verl divides groups of one by the fp32 constant (1.0 + eps): a relative ~5e-8 difference in fp64.
        torch.testing.assert_close(ours[alone], expected[alone], rtol=1e-7, atol=1e-10)
    expected, _ = core_algos.compute_rloo_outcome_advantage(scores.clone(), mask, uids)
    torch.testing.assert_close(broadcast_to_tokens(rloo_advantages(rewards, uids), mask), expected, **tol(dtype))


def policy_inputs(gen: torch.Generator, n: int, length: int, dtype: torch.dtype):
    mask = random_mask(gen, n, length)
    old = -3 * torch.rand(n, length, generator=gen, dtype=torch.float64)
    logp = old + 0.3 * torch.randn(n, length, generator=gen, dtype=torch.float64)
    extreme = torch.rand(n, length, generator=gen) < 0.03  # far outside the log-ratio clamp
    logp = torch.where(extreme, old + 30 * torch.randn(n, length, generator=gen, dtype=torch.float64), logp)
    per_token = torch.rand(n, 1, generator=gen) < 0.5  # token-level advantages on some rows, outcome on others
    adv = torch.where(
        per_token,
        torch.randn(n, length, generator=gen, dtype=torch.float64),
        torch.randn(n, 1, generator=gen, dtype=torch.float64).expand(n, length),
    )
    adv = torch.where(torch.rand(n, length, generator=gen) < 0.1, 0.0, adv)
    # The last row is always fully valid: make sure both clips are hit there even in tiny batches.
    adv[-1, :2] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    logp[-1, :2] = old[-1, :2] + torch.tensor([1.0, 3.0], dtype=torch.float64)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask.to(dtype)


def actor_config(clip_low: float, clip_high: float, c: float, agg: str, **global_batch_info) -> ActorConfig:
    return ActorConfig(
        strategy="fsdp",
        rollout_n=5,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=0.2,
        clip_ratio_low=clip_low,
        clip_ratio_high=clip_high,
        clip_ratio_c=c,
        loss_agg_mode=agg,
        global_batch_info=global_batch_info,
    )


@pytest.mark.parametrize("seed,dtype,shape", list(cases()))
@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_matches_verl_vanilla(seed, dtype, shape, agg):
    gen = torch.Generator().manual_seed(seed)
    n, length = shape[0] * shape[1], shape[2]
    logp, old, adv, mask = policy_inputs(gen, n, length, dtype)
    clip_low, clip_high, c = [(0.2, 0.2, 3.0), (0.2, 0.28, 3.0), (0.1, 0.3, 1.5), (0.3, 0.2, 10.0)][seed]

    ours_logp = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        ours_logp, old, adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip_c=c, agg=agg
    )
    loss.backward()
    verl_logp = logp.clone().requires_grad_(True)
    expected, verl_metrics = core_algos.compute_policy_loss_vanilla(
        old, verl_logp, adv, mask, agg, actor_config(clip_low, clip_high, c, agg)
    )
    expected.backward()

    # verl's seq-mean-token-mean divides each row by (count + 1e-8): a relative 1e-8 difference.
    loss_tol = {"rtol": 1e-7, "atol": 1e-10} if agg == "seq-mean-token-mean" and dtype == torch.float64 else tol(dtype)
    torch.testing.assert_close(loss, expected, **loss_tol)
    torch.testing.assert_close(ours_logp.grad, verl_logp.grad, **loss_tol)
    # verl's metric means divide by (count + 1e-8).
    for key in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"):
        assert metrics[key].item() == pytest.approx(verl_metrics[f"actor/{key}"], rel=1e-6, abs=1e-7), key
    assert metrics["pg_clipfrac"] > 0 and metrics["pg_clipfrac_lower"] > 0  # both clips exercised


@pytest.mark.parametrize("seed,dtype,shape", list(cases()))
@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregate_matches_verl(seed, dtype, shape, agg):
    gen = torch.Generator().manual_seed(seed)
    n, length = shape[0] * shape[1], shape[2]
    values = torch.randn(n, length, generator=gen, dtype=torch.float64).to(dtype)
    mask = random_mask(gen, n, length).to(dtype)
    agg_tol = {"rtol": 1e-7, "atol": 1e-10} if agg == "seq-mean-token-mean" and dtype == torch.float64 else tol(dtype)

    torch.testing.assert_close(aggregate(values, mask, agg), core_algos.agg_loss(values, mask, agg), **agg_tol)

    # One micro-batch of a larger data-parallel batch, normalised by the global count; the trainer scales each
    # rank's loss by the world size (gradients are averaged over ranks), where verl's agg_loss takes dp_size.
    global_count = 3 * n * length if agg == "token-mean" else 3 * n
    ours = aggregate(values, mask, agg, global_count=global_count) * 4
    expected = core_algos.agg_loss(
        values, mask, agg, dp_size=4, batch_num_tokens=global_count, global_batch_size=global_count
    )
    torch.testing.assert_close(ours, expected, **agg_tol)


KL_KINDS = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+", "k2+", "abs+"]


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_penalty_matches_verl(kind, dtype):
    gen = torch.Generator().manual_seed(7)
    ref = -4 * torch.rand(64, 16, generator=gen, dtype=torch.float64)
    logp = ref + torch.randn(64, 16, generator=gen, dtype=torch.float64)
    logp[0, :8] = ref[0, :8] + torch.tensor([-40.0, -25, -12, -3, 3, 12, 25, 40], dtype=torch.float64)  # clamps
    ref, logp = ref.to(dtype), logp.to(dtype)

    ours_logp = logp.clone().requires_grad_(True)
    ours = kl_penalty(ours_logp, ref, kind)
    ours.sum().backward()
    verl_logp = logp.clone().requires_grad_(True)
    expected = core_algos.kl_penalty(verl_logp, ref, kind)
    expected.sum().backward()

    torch.testing.assert_close(ours, expected, **tol(dtype))
    torch.testing.assert_close(ours_logp.grad, verl_logp.grad, **tol(dtype))


def test_entropy_matches_verl():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 9, 50, generator=gen, dtype=torch.float64) * 5
    exact = verl_F.entropy_from_logits(logits)
    torch.testing.assert_close(entropy_from_logits(logits), exact, **tol(torch.float64))
    # In fp32 verl's logsumexp - sum(p * logits) cancels (errors ~3e-6 here); -sum(p * log p) stays closer.
    assert (entropy_from_logits(logits.float()).double() - exact).abs().max() < 1e-6
