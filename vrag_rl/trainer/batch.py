"""Trajectories to training tensors: right-padded micro-batches that rebuild exactly what the sampler saw.

A micro-batch holds whole trajectories, padded on the right, with their images' pixel values and patch grids
concatenated in sequence order (the order the model's ``get_rope_index`` and image scatter consume them in).
Positions are the model's 3-D mRoPE index over each whole sequence; padding is masked out of attention and
of the loss. Micro-batches are cut by a token budget (padded length x rows), keeping the given order, so a
step's memory is bounded however long the trajectories grow.
"""

from __future__ import annotations

import torch

from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.models.forward import mrope_position_ids


def token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive index groups whose padded size (rows x longest) stays within ``max_tokens``; a sequence
    longer than the budget gets a group of its own."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and max(longest, n) * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def collate(trajectories: list[Trajectory], image_token_id: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, mm_token_type_ids, response_mask, sampled_logprobs
    (0 where unknown) and, with images, pixel_values and image_grid_thw."""
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
        batch["pixel_values"] = torch.cat(pixel_values)
        batch["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return batch


MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def forward_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0, with_entropy: bool = False):
    """(rows, width) log-prob of each token given its prefix (position 0 and padding: 0); with ``with_entropy``
    also the entropy of each position's next-token distribution, aligned the same way."""
    inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
    position_ids = mrope_position_ids(model, inputs["input_ids"], inputs["mm_token_type_ids"],
                                      inputs.get("image_grid_thw"), inputs["attention_mask"])  # fmt: skip
    logits = model(**inputs, position_ids=position_ids, use_cache=False).logits[:, :-1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    targets = inputs["input_ids"][:, 1:]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    pad = torch.zeros_like(logp[:, :1])
    logp = torch.cat([pad, logp], dim=1) * inputs["attention_mask"]
    if not with_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, torch.cat([pad, entropy], dim=1) * inputs["attention_mask"]
