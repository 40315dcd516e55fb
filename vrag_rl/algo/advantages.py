"""Outcome advantages for group-sampled rollouts (GRPO, RLOO) and their broadcast onto response tokens.

Every prompt is sampled several times; the rollouts of one prompt form a group (``group_ids``) and each
rollout's scalar reward is compared with the others of its group.

Conventions (shared with verl 0.9.1's ``grpo`` and ``rloo`` estimators, which the tests use as oracle):

* A group of one has no peers to compare with, so it gets baseline 0 and scale 1: GRPO gives
  ``r / (1 + eps)``, RLOO gives ``r``. (verl's ``rloo_vectorized`` gives 0 instead; we follow ``rloo``.)
* The GRPO std is the unbiased (Bessel-corrected) sample std.

One deliberate difference: group statistics are computed on rewards shifted by the group minimum, so a
group whose rewards are all equal gets exactly zero advantage. Computed naively, rounding in the mean
leaves a residue of about one ulp that the near-zero std then amplifies (eight fp32 rewards of 0.7 would
get +-0.056); the shift removes that and otherwise only changes results by rounding.
"""

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor


def group_index(group_ids: Sequence[Hashable] | Tensor, device: torch.device | None = None) -> tuple[Tensor, int]:
    """Dense group indices in 0..G-1 for arbitrary hashable ids (or an id tensor), and G."""
    if isinstance(group_ids, Tensor):
        _, index = torch.unique(group_ids.flatten(), return_inverse=True)
        return index.to(device), int(index.max().item()) + 1 if index.numel() else 0
    dense: dict[Hashable, int] = {}
    index = [dense.setdefault(gid, len(dense)) for gid in group_ids]
    return torch.tensor(index, dtype=torch.long, device=device), len(dense)


class _GroupStats:
    """Per-sample view of group statistics: centred reward, group size, and the group sums needed later."""

    def __init__(self, rewards: Tensor, group_ids: Sequence[Hashable] | Tensor):
        if rewards.dim() != 1:
            raise ValueError(f"rewards must have shape [N], got {tuple(rewards.shape)}")
        self.rewards = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())
        self.index, self.n_groups = group_index(group_ids, rewards.device)
        if self.index.numel() != rewards.numel():
            raise ValueError(f"{rewards.numel()} rewards but {self.index.numel()} group ids")
        floor = self.rewards.new_full((self.n_groups,), float("inf"))
        floor = floor.scatter_reduce(0, self.index, self.rewards, reduce="amin")
        shifted = self.rewards - floor[self.index]  # exact zeros within a group of equal rewards
        self.size = self.group_sum(torch.ones_like(shifted))
        self.centered = shifted - (self.group_sum(shifted) / self.size)  # 0 for groups of one
        self.singleton = self.size <= 1

    def group_sum(self, values: Tensor) -> Tensor:
        """Sum of ``values`` over each sample's group, gathered back to shape [N]."""
        sums = values.new_zeros(self.n_groups).index_add_(0, self.index, values)
        return sums[self.index]


def grpo_advantages(
    rewards: Tensor, group_ids: Sequence[Hashable] | Tensor, norm_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO advantage per sample: (r - group mean) / (group std + eps), or r - group mean without std.

    ``norm_by_std=False`` is the Dr. GRPO variant. Groups of one: mean 0, std 1 (see module docstring).
    """
    g = _GroupStats(rewards, group_ids)
    centered = torch.where(g.singleton, g.rewards, g.centered)
    if not norm_by_std:
        return centered
    std = (g.group_sum(g.centered.square()) / (g.size - 1).clamp_min(1)).sqrt()
    std = torch.where(g.singleton, 1.0, std)
    return centered / (std + eps)


def rloo_advantages(rewards: Tensor, group_ids: Sequence[Hashable] | Tensor) -> Tensor:
    """RLOO advantage per sample: r_i minus the mean reward of the *other* members of its group.

    Uses r_i - mean_{j != i} r_j = (r_i - group mean) * n / (n - 1). Groups of one keep r (baseline 0).
    """
    g = _GroupStats(rewards, group_ids)
    return torch.where(g.singleton, g.rewards, g.centered * g.size / (g.size - 1).clamp_min(1))


def broadcast_to_tokens(adv: Tensor, response_mask: Tensor) -> Tensor:
    """Spread each sample's scalar advantage over its response tokens: [N] x [N, L] -> [N, L], 0 off the mask."""
    return adv.unsqueeze(-1) * response_mask.to(adv.dtype)
