"""Token ids for the template pieces of a conversation, from the model's own processor.

`ChatEncoder` renders the prompt through the processor's chat template and produces the observation turns
(an image-only user turn, or a text feedback turn) as the ids the chat template would give at that point
of the conversation. Images must already be resized into the agent's budget (multiples of the patch
merge size); the encoder refuses images the processor would resize again, because crop coordinates are
read in the frame of the image as shown.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image


@dataclass
class EncodedImages:
    images: list[Image.Image]
    pixel_values: list[torch.Tensor]
    grids: list[tuple[int, int, int]]
    num_tokens: list[int]  # <|image_pad|> tokens each image takes in the sequence

    @staticmethod
    def join(parts: list[EncodedImages]) -> EncodedImages:
        """The images of ``parts``, in order, as one."""
        return EncodedImages(
            [i for p in parts for i in p.images],
            [v for p in parts for v in p.pixel_values],
            [g for p in parts for g in p.grids],
            [n for p in parts for n in p.num_tokens],
        )


class ChatEncoder:
    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        self.patch_size = ip.patch_size
        self.merge_size = ip.merge_size
        t = self.tokenizer
        self.image_token_id = t.convert_tokens_to_ids("<|image_pad|>")
        self.eos_token_id = t.convert_tokens_to_ids("<|im_end|>")
        # "<|im_end|>\n" closes an assistant turn in the template; the sampler already produced <|im_end|>.
        self.turn_separator_ids = self._ids("\n")
        self.assistant_header_ids = self._ids("<|im_start|>assistant\n")

    def check_budget(self, min_pixels: int, max_pixels: int) -> None:
        """Fail early if images resized into this budget would be resized again by the processor."""
        ip = self.processor.image_processor
        lo, hi = ip.size["shortest_edge"], ip.size["longest_edge"]
        if min_pixels < lo or max_pixels > hi:
            raise ValueError(
                f"image budget [{min_pixels}, {max_pixels}] pixels must lie inside the processor's [{lo}, {hi}]"
            )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_images(self, images: list[Image.Image]) -> EncodedImages:
        if not images:
            return EncodedImages([], [], [], [])
        images = [im.convert("RGB") for im in images]
        out = self.processor.image_processor(images=images, return_tensors="pt")
        grids = [tuple(int(x) for x in g) for g in out["image_grid_thw"]]
        pixel_values, start = [], 0
        for image, (t, h, w) in zip(images, grids):
            if (h * self.patch_size, w * self.patch_size) != (image.height, image.width):
                raise ValueError(
                    f"the processor resized a {image.width}x{image.height} image to "
                    f"{w * self.patch_size}x{h * self.patch_size}: the agent's image budget must lie inside the "
                    "processor's min/max pixels and sides must be multiples of patch_size * merge_size"
                )
            pixel_values.append(out["pixel_values"][start : start + t * h * w])
            start += t * h * w
        return EncodedImages(images, pixel_values, grids, [t * h * w // self.merge_size**2 for t, h, w in grids])

    def _user_content_ids(self, text: str | None, encoded: EncodedImages) -> list[int]:
        ids: list[int] = []
        for n in encoded.num_tokens:
            ids += self._ids("<|vision_start|>") + [self.image_token_id] * n + self._ids("<|vision_end|>")
        if text:
            ids += self._ids(text)
        return ids

    def prompt(self, messages: list[dict], images: list[Image.Image] = ()) -> tuple[list[int], EncodedImages]:
        """Prompt ids (ending with the assistant header) for chat messages holding len(images) image parts."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        encoded = self.encode_images(list(images))
        pieces = text.split("<|image_pad|>")
        if len(pieces) - 1 != len(encoded.images):
            raise ValueError(f"the messages hold {len(pieces) - 1} images but {len(encoded.images)} were given")
        ids = self._ids(pieces[0])
        for n, piece in zip(encoded.num_tokens, pieces[1:]):
            ids += [self.image_token_id] * n + self._ids(piece)
        return ids, encoded

    def observation(
        self, images: list[Image.Image] | EncodedImages = (), text: str | None = None, close_turn: bool = False
    ) -> tuple[list[int], EncodedImages]:
        """Ids of a user turn (images, then optional text) and the next assistant header.

        ``images`` may come encoded already (``encode_images``), e.g. a page shown to many trajectories.

        ``close_turn``: the previous assistant turn did not end with <|im_end|> (e.g. it hit the token limit),
        so the template's end-of-turn token is added here, outside the response mask.
        """
        encoded = images if isinstance(images, EncodedImages) else self.encode_images(list(images))
        ids = [self.eos_token_id] if close_turn else []
        ids += self.turn_separator_ids + self._ids("<|im_start|>user\n")
        ids += self._user_content_ids(text, encoded) + self._ids("<|im_end|>\n") + self.assistant_header_ids
        return ids, encoded
