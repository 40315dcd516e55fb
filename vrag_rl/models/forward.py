"""Training-side forward over whole multi-turn sequences: mRoPE positions, per-token log-probs, shared images.

Qwen2.5-VL places image tokens on a (temporal, height, width) grid and text after them; a multi-turn
sequence with images in several turns needs the model's own ``get_rope_index`` over the *whole* sequence
(a 1-D fallback silently changes what the model sees). transformers takes position ids as 4 rows: the
plain text position (used for masking) and the three mRoPE rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

# Placeholders of the vision input. A sampled one would announce an image that is not there (and break the
# position index of every later turn), so they are outside the policy's action space: engines never sample
# them and every log-prob here is of the distribution renormalised without them, which is exactly what the
# engines sample from.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def banned_token_ids(tokenizer) -> list[int]:
    """Ids of the vision placeholder tokens the tokenizer knows."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[t] for t in VISION_TOKENS if t in vocab)


def policy_log_softmax(logits: torch.Tensor, temperature: float = 1.0, banned: Sequence[int] = ()) -> torch.Tensor:
    """Log-probs of the sampling distribution: logits / temperature, banned ids at -inf, in float32."""
    logits = logits.float() / temperature
    if len(banned):
        logits = logits.index_fill(-1, torch.tensor(list(banned), device=logits.device), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def target_logprobs(log_probs: torch.Tensor, targets: torch.Tensor, banned: Sequence[int] = ()) -> torch.Tensor:
    """Log-prob of each target under ``log_probs``; 0 where the target is a banned placeholder (image tokens
    of the input are never sampled, and -inf there would turn masked sums into NaN)."""
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if len(banned):
        logp = torch.where(torch.isin(targets, torch.tensor(list(banned), device=targets.device)), 0.0, logp)
    return logp


def mrope_position_ids(
    model,
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """(4, batch, seq) position ids: text positions, then the model's 3-D rope index."""
    rope, _ = model.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
    )
    text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return torch.cat([text.unsqueeze(0), rope.to(text.dtype)], dim=0)


def token_logprobs(
    model, inputs: dict[str, torch.Tensor], temperature: float = 1.0, banned: Sequence[int] = ()
) -> torch.Tensor:
    """Log-prob of every token given its prefix: (batch, seq) with position 0 set to 0.

    ``inputs`` holds input_ids, attention_mask, mm_token_type_ids and, with images, pixel_values and
    image_grid_thw. Logits are divided by the sampling temperature so the values are those of the
    distribution the sampler drew from; ``banned`` ids (``banned_token_ids``) are excluded from it likewise.
    """
    position_ids = mrope_position_ids(
        model, inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"), inputs["attention_mask"]
    )
    out = model(**inputs, position_ids=position_ids, use_cache=False)
    targets = inputs["input_ids"][:, 1:]
    logp = target_logprobs(policy_log_softmax(out.logits[:, :-1], temperature, banned), targets, banned)
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)


class _Repeated(torch.autograd.Function):
    """Row spans of ``features`` copied into occurrence order. The backward adds each occurrence's gradient into
    its span one occurrence after another: with indexing's own backward, 1 repeated update in 4 came out different
    in the last bits (the repeated rows' gradients summed in a changing order), and exact resume needs bit for bit."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        ctx.spans, ctx.rows = spans, features.shape[0]
        return torch.cat([features[start : start + n] for start, n in spans])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_zeros((ctx.rows, *grad.shape[1:]))
        offset = 0
        for start, n in ctx.spans:
            out[start : start + n] += grad[offset : offset + n]
            offset += n
        return out, None


@contextlib.contextmanager
def shared_images(model, source: torch.Tensor | None, grids: torch.Tensor | None) -> Iterator[None]:
    """Within it, the model's forward runs its vision tower over distinct images only.

    ``pixel_values`` then hold each distinct image once while ``grids`` keep one row per image occurrence, and
    ``source[i]`` is the distinct image of occurrence i (``trainer.batch.collate`` makes these: a GRPO group's
    samples share their prompt's pages). The tower gets the distinct images' grids, and its merged features are
    repeated into occurrence order before they replace the image tokens: the same features, and, through the
    repetition, the same gradient sums as a tower run once per occurrence.
    """
    if source is None:
        yield
        return
    occurrences = source.tolist()
    first = [occurrences.index(j) for j in range(max(occurrences) + 1)]  # collate numbers them in first-seen order
    visual = model.model.visual
    distinct_grids = grids[first]
    merged = (distinct_grids.prod(-1) // visual.spatial_merge_size**2).tolist()  # feature rows per distinct image
    starts = [sum(merged[:j]) for j in range(len(merged))]
    spans = [(starts[j], merged[j]) for j in occurrences]

    def with_distinct_grids(_module, args, kwargs):
        if len(args) > 1:  # (hidden_states, grid_thw, ...)
            return (args[0], distinct_grids, *args[2:]), kwargs
        return args, {**kwargs, "grid_thw": distinct_grids}

    def repeated(_module, _args, _kwargs, output):
        output.pooler_output = _Repeated.apply(output.pooler_output, spans)
        return output

    handles = [
        visual.register_forward_pre_hook(with_distinct_grids, with_kwargs=True),
        visual.register_forward_hook(repeated, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
