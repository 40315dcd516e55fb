"""Training-side forward over whole multi-turn sequences: mRoPE positions and per-token log-probs.

Qwen2.5-VL places image tokens on a (temporal, height, width) grid and text after them; a multi-turn
sequence with images in several turns needs the model's own ``get_rope_index`` over the *whole* sequence
(a 1-D fallback silently changes what the model sees). transformers takes position ids as 4 rows: the
plain text position (used for masking) and the three mRoPE rows.
"""

from __future__ import annotations

import torch


def mrope_position_ids(model, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                       image_grid_thw: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor:
    """(4, batch, seq) position ids: text positions, then the model's 3-D rope index."""
    rope, _ = model.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
    )
    text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return torch.cat([text.unsqueeze(0), rope.to(text.dtype)], dim=0)


def token_logprobs(model, inputs: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of every token given its prefix: (batch, seq) with position 0 set to 0.

    ``inputs`` holds input_ids, attention_mask, mm_token_type_ids and, with images, pixel_values and
    image_grid_thw. Logits are divided by the sampling temperature so the values are those of the
    distribution the sampler drew from.
    """
    position_ids = mrope_position_ids(
        model, inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"), inputs["attention_mask"]
    )
    out = model(**inputs, position_ids=position_ids, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature
    targets = inputs["input_ids"][:, 1:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)
