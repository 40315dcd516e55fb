"""GRPO / RLOO advantages against a plain-Python oracle, plus their edge cases."""

import random
import statistics

import numpy as np
import pytest
import torch

from vrag_rl.algo.advantages import broadcast_to_tokens, group_index, grpo_advantages, rloo_advantages


def oracle(rewards: list[float], groups: list, kind: str, norm_by_std: bool = True, eps: float = 1e-6):
    """Textbook formulas, one sample at a time."""
    out = []
    for r, g in zip(rewards, groups):
        peers = [x for x, h in zip(rewards, groups) if h == g]
        if len(peers) == 1:
            out.append(r / (1 + eps) if kind == "grpo" and norm_by_std else r)
        elif kind == "grpo":
            centred = r - statistics.fmean(peers)
            out.append(centred / (statistics.stdev(peers) + eps) if norm_by_std else centred)
        else:
            others = list(peers)
            others.remove(r)
            out.append(r - statistics.fmean(others))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_matches_python_oracle(seed):
    rng = random.Random(seed)
    groups = [rng.choice(["a", "b", "c", ("d", 1), 7]) for _ in range(rng.randint(1, 25))]
    rewards = [rng.choice([0.0, 1.0, rng.random(), rng.uniform(-3, 3)]) for _ in groups]
    r = torch.tensor(rewards, dtype=torch.float64)
    for norm in (True, False):
        expected = torch.tensor(oracle(rewards, groups, "grpo", norm), dtype=torch.float64)
        torch.testing.assert_close(grpo_advantages(r, groups, norm_by_std=norm), expected, rtol=1e-12, atol=1e-12)
    expected = torch.tensor(oracle(rewards, groups, "rloo"), dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(r, groups), expected, rtol=1e-12, atol=1e-12)


def test_groups_of_one_use_baseline_zero_and_unit_std():
    r = torch.tensor([0.7, -2.0, 1.0, 3.0], dtype=torch.float64)
    groups = ["x", "y", "z", "z"]
    grpo = grpo_advantages(r, groups, eps=1e-6)
    assert grpo[:2].tolist() == pytest.approx([0.7 / (1 + 1e-6), -2.0 / (1 + 1e-6)], rel=1e-15)
    assert grpo_advantages(r, groups, norm_by_std=False)[:2].tolist() == [0.7, -2.0]
    assert rloo_advantages(r, groups).tolist() == [0.7, -2.0, -2.0, 2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.7, 0.1, 0.3, 0.9, 1 / 3, 1e6 + 0.1])
@pytest.mark.parametrize("size", [2, 3, 5, 8, 16])
def test_identical_rewards_give_exactly_zero(dtype, value, size):
    # Naive mean/std leave a one-ulp residue amplified by the tiny std (0.056 for eight fp32 0.7s).
    r = torch.tensor([value] * size + [0.0, 1.0], dtype=dtype)
    groups = [0] * size + [1, 1]
    assert grpo_advantages(r, groups)[:size].eq(0).all()
    assert rloo_advantages(r, groups)[:size].eq(0).all()
    assert grpo_advantages(r, groups)[size:].abs().gt(0.5).all()


def test_group_ids_as_any_hashable_or_tensor_give_same_result():
    r = torch.tensor([1.0, 0.0, 0.5, 0.25, 1.0, 0.0])
    expected = grpo_advantages(r, ["p", "q", "p", "q", "r", "r"])
    as_numpy = np.array(["p", "q", "p", "q", "r", "r"], dtype=object)
    for ids in ([3, 9, 3, 9, 4, 4], as_numpy, torch.tensor([3, 9, 3, 9, 4, 4])):
        torch.testing.assert_close(grpo_advantages(r, ids), expected)
    index, n_groups = group_index(["p", "q", "p", ("t", 1)])
    assert index.tolist() == [0, 1, 0, 2] and n_groups == 3


def test_permutation_equivariant_and_zero_mean_per_group():
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(40, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, 6, (40,), generator=gen)
    perm = torch.randperm(40, generator=gen)
    for fn in (grpo_advantages, rloo_advantages):
        adv = fn(r, groups)
        torch.testing.assert_close(fn(r[perm], groups[perm]), adv[perm])
        for g in groups.unique():
            assert (groups == g).sum() > 1 and adv[groups == g].sum().abs() < 1e-12


def test_integer_rewards_are_promoted():
    adv = grpo_advantages(torch.tensor([1, 0, 1, 0]), ["a", "a", "b", "b"])
    assert adv.dtype == torch.get_default_dtype()
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.5, -0.5]) / (2**-0.5 + 1e-6))


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(3), ["a", "b"])
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(3, 1), ["a", "b", "c"])


def test_broadcast_to_tokens_zero_off_mask():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0, 5.0]), mask)
    assert out.tolist() == [[2, 2, 0, 0], [0, -1, 0, -1], [0, 0, 0, 0]]
