"""The trajectory record: token-in / token-out, exactly as the policy saw and produced it.

A trajectory is one flat token sequence in the Qwen2.5-VL chat format:

    prompt (chat template + generation header)            mask 0
    assistant turn 1: the exact sampled ids (…<|im_end|>)  mask 1, with sampler log-probs
    observation: "\\n<|im_start|>user\\n<image>|feedback<|im_end|>\\n<|im_start|>assistant\\n"   mask 0
    assistant turn 2 …

Sampled ids are never decoded and re-encoded (that does not round-trip); template pieces around them are
tokenized on their own, which equals tokenizing the whole rendered conversation because every seam sits
next to a special token that the tokenizer splits on. Images are stored as shown (already resized into the
budget) together with their pixel values and (t, h, w) patch grid, so a training forward rebuilds exactly
the multi-modal inputs the sampler saw.

The length limit is one rule: a piece is appended whole or not at all, so an image's tokens are never cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

ROLE_PROMPT, ROLE_MODEL, ROLE_OBSERVATION = "prompt", "model", "observation"


@dataclass
class Segment:
    role: str  # prompt | model | observation
    ids: list[int]
    logprobs: list[float] | None = None  # model segments only, one per id, when the sampler gave them
    num_images: int = 0


@dataclass
class Trajectory:
    segments: list[Segment] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)  # in order of appearance, as shown to the model
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # one (patches, dim) tensor per image
    image_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)
    max_length: int | None = None
    truncated: bool = False  # a piece did not fit in max_length; the trajectory cannot continue

    @property
    def input_ids(self) -> list[int]:
        return [i for s in self.segments for i in s.ids]

    def __len__(self) -> int:
        return sum(len(s.ids) for s in self.segments)

    @property
    def prompt_length(self) -> int:
        return len(self.segments[0].ids) if self.segments and self.segments[0].role == ROLE_PROMPT else 0

    @property
    def response_mask(self) -> list[int]:
        """1 on tokens the policy sampled, 0 on prompt, observation, feedback and template tokens."""
        return [int(s.role == ROLE_MODEL) for s in self.segments for _ in s.ids]

    @property
    def sampled_logprobs(self) -> list[float | None]:
        """The sampler's log-prob for each token (None where not sampled or not recorded)."""
        out: list[float | None] = []
        for s in self.segments:
            out.extend(s.logprobs if s.logprobs is not None else [None] * len(s.ids))
        return out

    @property
    def turn_lengths(self) -> list[int]:
        """The token count of each assistant turn, in order."""
        return [len(s.ids) for s in self.segments if s.role == ROLE_MODEL]

    @property
    def engine_logprobs(self) -> torch.Tensor:
        """The sampler's log-probs of the response tokens, in order (every model turn must have recorded them)."""
        if any(s.role == ROLE_MODEL and s.logprobs is None for s in self.segments):
            raise ValueError("a model turn of this trajectory has no recorded log-probs")
        return torch.tensor([lp for s in self.segments if s.role == ROLE_MODEL for lp in s.logprobs])

    @property
    def num_model_turns(self) -> int:
        return sum(s.role == ROLE_MODEL for s in self.segments)

    def room(self) -> int | None:
        """Tokens left before max_length (None when unlimited)."""
        return None if self.max_length is None else self.max_length - len(self)

    def fits(self, num_tokens: int) -> bool:
        room = self.room()
        return room is None or num_tokens <= room

    def _append(self, segment: Segment) -> bool:
        if self.truncated or not self.fits(len(segment.ids)):
            self.truncated = True
            return False
        self.segments.append(segment)
        return True

    def add_prompt(self, ids: list[int], images=(), pixel_values=(), grids=()) -> bool:
        if self.segments:
            raise ValueError("the prompt must be the first segment")
        return self._add_with_images(
            Segment(ROLE_PROMPT, list(ids), num_images=len(images)), images, pixel_values, grids
        )

    def add_model_turn(self, ids: list[int], logprobs: list[float] | None = None) -> bool:
        """Append the exact ids the policy sampled for one assistant turn (with their log-probs if known)."""
        if logprobs is not None and len(logprobs) != len(ids):
            raise ValueError(f"{len(logprobs)} log-probs for {len(ids)} sampled ids")
        return self._append(Segment(ROLE_MODEL, list(ids), None if logprobs is None else list(logprobs)))

    def add_observation(self, ids: list[int], images=(), pixel_values=(), grids=()) -> bool:
        return self._add_with_images(
            Segment(ROLE_OBSERVATION, list(ids), num_images=len(images)), images, pixel_values, grids
        )

    def _add_with_images(self, segment, images, pixel_values, grids) -> bool:
        if not (len(images) == len(pixel_values) == len(grids)):
            raise ValueError("images, pixel_values and grids must have the same length")
        if not self._append(segment):
            return False
        self.images.extend(images)
        self.pixel_values.extend(pixel_values)
        self.image_grid_thw.extend(tuple(int(x) for x in g) for g in grids)
        return True

    def model_inputs(self, image_token_id: int) -> dict[str, torch.Tensor]:
        """Batch-of-one tensors for a forward over the whole sequence (positions added by the caller)."""
        ids = torch.tensor([self.input_ids], dtype=torch.long)
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == image_token_id).to(torch.int32),
        }
        if self.images:
            inputs["pixel_values"] = torch.cat(self.pixel_values, dim=0)
            inputs["image_grid_thw"] = torch.tensor(self.image_grid_thw, dtype=torch.long)
        return inputs
