"""Trajectories to training tensors: right-padded micro-batches that rebuild exactly what the sampler saw.

A micro-batch holds whole trajectories, padded on the right, with their images' patch grids in sequence order (the
order the model's ``get_rope_index`` and image scatter consume them in) and each distinct image's pixel values
once: the vision tower runs once per distinct image (``models.forward.shared_images``).
Positions are the model's 3-D mRoPE index over each whole sequence; padding is masked out of attention and
of the loss. Micro-batches are cut by a token budget (padded length x rows), keeping the given order, so a
step's memory is bounded however long the trajectories grow.

Above micro-batches: a step's rollouts are cut into mini-batches of whole GRPO groups
(``minibatches_by_group``), and a mini-batch is spread over the data-parallel ranks (``split_over_ranks``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.algo.losses import entropy_from_logits
from vrag_rl.learner.payloads import Batch, MicroBatch, RankShare
from vrag_rl.models.forward import mrope_position_ids, policy_log_softmax, shared_images, target_logprobs


def token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive index groups whose padded size (rows x longest) stays within ``max_tokens`` and at most
    twice their real tokens (a long sequence does not pad a crowd of short ones to its length); a sequence
    longer than the budget gets a group of its own."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    groups: list[list[int]] = []
    current: list[int] = []
    longest = real = 0
    for i, n in enumerate(lengths):
        padded = max(longest, n) * (len(current) + 1)
        if current and (padded > max_tokens or padded > 2 * (real + n)):
            groups.append(current)
            current, longest, real = [], 0, 0
        current.append(i)
        longest, real = max(longest, n), real + n
    if current:
        groups.append(current)
    return groups


def collate(trajectories: list[Trajectory], image_token_id: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, mm_token_type_ids, response_mask, sampled_logprobs
    (0 where unknown) and, with images, pixel_values (each distinct image once), image_grid_thw (one row per
    image in sequence order) and, where an image recurs, image_source (its distinct copy, per image)."""
    if not trajectories:
        raise ValueError("no trajectories to collate")
    width = max(len(t) for t in trajectories)
    rows = len(trajectories)
    ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    response = torch.zeros((rows, width), dtype=torch.float32)
    sampled = torch.zeros((rows, width), dtype=torch.float32)
    pixel_values, grids = [], []
    for r, t in enumerate(trajectories):
        n = len(t)
        ids[r, :n] = torch.tensor(t.input_ids)
        attention[r, :n] = 1
        response[r, :n] = torch.tensor(t.response_mask, dtype=torch.float32)
        sampled[r, :n] = torch.tensor([0.0 if lp is None else lp for lp in t.sampled_logprobs])
        pixel_values.extend(t.pixel_values)
        grids.extend(t.image_grid_thw)
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "mm_token_type_ids": ((ids == image_token_id) & attention.bool()).to(torch.int32),
        "response_mask": response,
        "sampled_logprobs": sampled,
    }
    if pixel_values:
        distinct, source = distinct_images(pixel_values)
        batch["pixel_values"] = torch.cat(distinct)
        batch["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        if len(distinct) < len(pixel_values):
            batch["image_source"] = torch.tensor(source, dtype=torch.long)
    return batch


def distinct_images(pixel_values: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Each distinct image's pixel values once, and per image the index of its distinct copy (equal values:
    a group's samples share their prompt's pages, and a page found twice is the same pixels)."""
    distinct: list[torch.Tensor] = []
    source: list[int] = []
    by_key: dict[tuple, list[int]] = {}
    for p in pixel_values:
        key = (tuple(p.shape), float(p[0].sum()), float(p[-1].sum()))  # cheap; torch.equal decides
        same = [j for j in by_key.get(key, []) if distinct[j] is p or torch.equal(distinct[j], p)]
        if same:
            source.append(same[0])
            continue
        by_key.setdefault(key, []).append(len(distinct))
        source.append(len(distinct))
        distinct.append(p)
    return distinct, source


MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def forward_logprobs(
    model,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    with_entropy: bool = False,
    banned: Sequence[int] = (),
):
    """(rows, width) log-prob of each response token given its prefix (0 at every other position) under the
    sampling distribution (temperature, ``banned`` ids excluded); with ``with_entropy`` also the entropy of
    the next-token distribution each response token was drawn from, aligned the same way.

    Logits are computed only at the positions that predict a response token of some row: prompts, images and
    tool outputs are most of a trajectory, and the vocabulary projection and softmax over them were most of
    the cost of a step.
    """
    inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
    position_ids = mrope_position_ids(
        model, inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"), inputs["attention_mask"]
    )
    response = batch["response_mask"]
    targets = response.any(0).nonzero().squeeze(1)  # columns holding a response token in some row
    targets = targets[targets > 0]  # position 0 has no prefix
    with shared_images(model, batch.get("image_source"), inputs.get("image_grid_thw")):
        logits = model(**inputs, position_ids=position_ids, use_cache=False, logits_to_keep=targets - 1).logits
    logp_all = policy_log_softmax(logits, temperature, banned)
    columns = targets.expand(response.shape[0], -1)
    logp = torch.zeros(response.shape, dtype=logp_all.dtype, device=response.device)
    logp = logp.index_copy(1, targets, target_logprobs(logp_all, inputs["input_ids"].gather(1, columns), banned))
    logp = logp * response
    if not with_entropy:
        return logp
    entropy = torch.zeros_like(logp).index_copy(1, targets, entropy_from_logits(logp_all))  # banned ids: p = 0
    return logp, entropy * response


def plan_ranks(lengths: list[int], world_size: int, max_tokens: int) -> list[list[MicroBatch]]:
    """Spread sequences over data-parallel ranks and cut each rank's share into token-budget micro-batches.

    Returns per rank a list of (indices, weight). Every rank gets the same number of micro-batches, because
    each forward of a sharded model is a collective: a rank with less work repeats one of its micro-batches
    (or sequence 0) with weight 0, which adds nothing to the loss. Longest sequences are placed first on the
    least-loaded rank, and each rank's share is sorted by length so that padding stays small.
    """
    if world_size < 1 or not lengths:
        raise ValueError(f"need world_size >= 1 and at least one sequence, got {world_size} and {len(lengths)}")
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += lengths[i]
    plans = []
    for share in shares:
        share.sort(key=lambda i: (lengths[i], i))
        groups = token_budget_batches([lengths[i] for i in share], max_tokens)
        plans.append([([share[j] for j in g], 1.0) for g in groups])
    count = max(len(p) for p in plans)
    for p in plans:
        filler = p[0][0] if p else [0]
        p.extend((filler, 0.0) for _ in range(count - len(p)))
    return plans


def split_over_ranks(batch: Batch, world_size: int, max_tokens: int) -> list[RankShare]:
    """``plan_ranks`` over the batch's trajectories, each rank's plan re-indexed into its own trajectories."""
    shares = []
    num_tokens = batch.response_tokens
    for plan in plan_ranks([len(t) for t in batch.trajectories], world_size, max_tokens):
        local: dict[int, int] = {}  # batch index -> index into the rank's trajectories, in plan order
        for indices, _ in plan:
            for i in indices:
                local.setdefault(i, len(local))
        mine = list(local)
        rank_plan = [([local[i] for i in ix], w) for ix, w in plan]
        shares.append(RankShare(batch.take(mine), rank_plan, mine, num_tokens))
    return shares


def minibatches_by_group(group_ids: list[int], parts: int, rng: random.Random) -> list[list[int]]:
    """One pass's mini-batches: trajectory indices, the groups in an order drawn from ``rng`` and cut into
    ``parts`` near-equal runs. A group is never split: its advantages are relative to each other."""
    groups = sorted(set(group_ids))
    order = rng.sample(groups, len(groups))
    out = []
    for part in np.array_split(np.array(order), parts):
        chosen = set(part.tolist())
        out.append([i for i, g in enumerate(group_ids) if g in chosen])
    return out
