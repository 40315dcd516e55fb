"""Token ids for the template pieces of a conversation, from the model's own processor.

`ChatEncoder` renders the prompt through the processor's chat template and produces the observation turns
(an image-only user turn, or a text feedback turn) as the ids the chat template would give at that point
of the conversation. Images must already be resized into the agent's budget (multiples of the patch
merge size); the encoder refuses images the processor would resize again, because crop coordinates are
read in the frame of the image as shown.

Only the template's own markup becomes special tokens. Text inside messages (a user's question, feedback, an
endpoint's reply through ``LiteralText``) is encoded as text, with special-token markup split into the characters
it is made of (``split_special_tokens``): ``<|im_start|>system`` in a question cannot open a system turn, and
``<|image_pad|>`` in a reply cannot claim an image.
"""

from __future__ import annotations

import re
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


class LiteralText:
    """Token ids of text as text: special-token markup in it is split as ``tokenizer(text,
    split_special_tokens=True)`` splits it. Encoded by a copy of the tokenizer's backend that keeps that setting,
    because transformers switches it on the shared backend for each call, which is not safe across threads."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.encode_special_tokens = True

    def __call__(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids if text else []


_TEXT_MARK = re.compile("\ue000(\\d+)\ue001")  # stands for the n-th text of the messages while the template renders


def _marked(content, texts: list[str]):
    """``content`` with each text replaced by a mark; the texts are appended to ``texts``."""
    if isinstance(content, str):
        texts.append(content)
        return f"\ue000{len(texts) - 1}\ue001"
    return [dict(p, text=_marked(p["text"], texts)) if p.get("type") == "text" else p for p in content]


class ChatEncoder:
    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.literal_ids = LiteralText(self.tokenizer)
        special = {t.content: i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        self._special_ids = special
        self._special = re.compile("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) or "(?!)")
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
            ids += self.literal_ids(text)
        return ids

    def prompt(self, messages: list[dict], images: list[Image.Image] = ()) -> tuple[list[int], EncodedImages]:
        """Prompt ids (ending with the assistant header) for chat messages holding len(images) image parts; the
        messages' texts are encoded as text (see the module docstring).

        The template renders the messages with a mark in place of each text, so that its own markup is known;
        the text between two of its special tokens is then encoded in one piece, as the tokenizer encodes a
        rendered conversation (the same ids wherever the texts hold no markup)."""
        texts: list[str] = []
        marked = [dict(m, content=_marked(m["content"], texts)) for m in messages]
        render = self.processor.apply_chat_template
        template = render(marked, add_generation_prompt=True, tokenize=False)
        pieces = _TEXT_MARK.split(template)  # template text, a text's number, template text, ...
        full = "".join(texts[int(p)] if k % 2 else p for k, p in enumerate(pieces))
        if full != render(messages, add_generation_prompt=True, tokenize=False):
            raise ValueError("the chat template changes the messages' text: it cannot be encoded as given")
        encoded = self.encode_images(list(images))
        images_in_template = sum(p.count("<|image_pad|>") for p in pieces[::2])
        if images_in_template != len(encoded.images):
            raise ValueError(f"the messages hold {images_in_template} images but {len(encoded.images)} were given")
        ids, text, image_tokens = [], "", iter(encoded.num_tokens)
        for k, piece in enumerate(pieces):
            if k % 2:
                text += texts[int(piece)]
                continue
            start = 0
            for m in self._special.finditer(piece):
                ids += self.literal_ids(text + piece[start : m.start()])
                text, start = "", m.end()
                token = self._special_ids[m.group()]
                ids += [token] * next(image_tokens) if token == self.image_token_id else [token]
            text += piece[start:]
        return ids + self.literal_ids(text), encoded

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
