"""Rollout engine over any OpenAI-compatible chat endpoint serving a VLM (``vllm serve EXPORT``, an API model).

The agent loop stays token-in/token-out: it keeps the trajectory in the ids of a local processor (the chat
template of ``processor_dir``) and asks this engine for the next assistant turn. The engine turns the
request's ids back into chat messages (the template's ``<|im_start|>ROLE ... <|im_end|>`` turns; every
``<|vision_start|><|image_pad|>...<|vision_end|>`` run becomes the next of the request's images, sent inline
as a PNG data URL at the size it was shown), sends them to ``POST {base_url}/chat/completions`` and returns
the reply tokenized by the local tokenizer. Crop boxes therefore refer to the image as the endpoint saw it.

A reply is text: it is tokenized with special-token markup split (``agent.chat.LiteralText``), and messages are
read from the ids' special tokens, never from decoded text, so markup that a reply spells (an image placeholder,
a system turn) stays text in the trajectory and in every later request.

The endpoint's own log-probs are of its tokenizer's ids, not ours: this engine reports 0.0 for each token and
is for evaluation and serving, never for training (``update_weights`` refuses). A request that fails after
the bounded retries of ``chat_api``, or that cannot be sent, becomes an empty turn with ``Generation.error`` set:
the agent loop counts it and treats it as an invalid action, so one dead endpoint never ends an evaluation.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from PIL import Image

from vrag_rl.agent.chat import LiteralText
from vrag_rl.chat_api import OK, ChatAPI, Retries, api_key_from_env
from vrag_rl.rollout.engine import Generation, GenerationRequest, RolloutEngine, SamplingConfig, max_new_tokens


@dataclass
class EndpointConfig:
    base_url: str = ""  # e.g. http://127.0.0.1:8000/v1
    model: str = ""  # the served model's name
    api_key_env: str | None = None  # name of the environment variable holding the API key (never the key)
    timeout_s: float = 300.0  # per attempt (chat_api)
    max_retries: int = 2
    max_in_flight: int = 8  # concurrent requests
    max_response_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")) or not self.model:
            raise ValueError(f"endpoint: base_url (http:// or https://) and model are required, got {self.base_url!r}")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.max_in_flight < 1:
            raise ValueError("endpoint: timeout_s > 0, max_retries >= 0, max_in_flight >= 1")

    def api_key(self) -> str | None:
        return api_key_from_env(self.api_key_env, "endpoint.api_key_env")


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class ChatIds:
    """The template's special tokens of a tokenizer, and chat messages read from a conversation's ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = tokenizer.convert_tokens_to_ids
        self.start, self.end = ids("<|im_start|>"), ids("<|im_end|>")
        self.vision_start, self.image, self.vision_end = (
            ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
        )

    def to_messages(self, ids: list[int], images: list[Image.Image]) -> list[dict]:
        """Chat messages of a conversation's ids: a turn runs from ``<|im_start|>`` to ``<|im_end|>``, its first
        line is the role; every ``<|vision_start|><|image_pad|>...<|vision_end|>`` run takes the next image; the
        rest is decoded as text. The final empty assistant header, the turn to generate, is dropped."""
        turns: list[list[int] | None] = []
        for t in ids:
            if t == self.start:
                turns.append([])
            elif t == self.end:
                turns.append(None)  # text after a turn's end (its newline) belongs to no turn
            elif turns and turns[-1] is not None:
                turns[-1].append(t)
        pending = iter(images)
        messages = [self._message(body, pending) for body in turns if body is not None]
        if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
            messages.pop()
        return messages

    def _message(self, body: list[int], pending) -> dict:
        parts, text, k = [], [], 0
        while k < len(body):
            j = k + 1
            while body[k] == self.vision_start and j < len(body) and body[j] == self.image:
                j += 1
            if j > k + 1 and j < len(body) and body[j] == self.vision_end:
                parts.append({"type": "text", "text": self.tokenizer.decode(text)})
                image = next(pending, None)
                if image is None:
                    raise ValueError("the request holds more image placeholders than images")
                parts.append({"type": "image_url", "image_url": {"url": data_url(image)}})
                text, k = [], j + 1
            else:
                text.append(body[k])
                k += 1
        parts.append({"type": "text", "text": self.tokenizer.decode(text)})
        role, newline, parts[0]["text"] = parts[0]["text"].partition("\n")
        if not newline or not role.isidentifier():
            raise ValueError(f"a turn of the request has no role line: {role[:40]!r}")
        parts = [p for p in parts if p["type"] != "text" or p["text"]]
        if all(p["type"] == "text" for p in parts):
            return {"role": role, "content": "".join(p["text"] for p in parts)}
        return {"role": role, "content": parts}


class EndpointEngine(RolloutEngine):
    def __init__(self, processor_dir: str, cfg: EndpointConfig):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(processor_dir)
        self.stop_token_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.chat, self.literal_ids = ChatIds(self.tokenizer), LiteralText(self.tokenizer)
        self._api = ChatAPI(cfg.base_url, cfg.api_key(), cfg.timeout_s, cfg.max_in_flight, cfg.max_response_bytes)
        self._retries = Retries(cfg.max_retries)

    def generate(self, requests: list[GenerationRequest], sampling: SamplingConfig) -> list[Generation]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.max_in_flight, len(requests))) as pool:
            return list(pool.map(lambda r: self._one(r, sampling), requests))

    def payload(self, request: GenerationRequest, sampling: SamplingConfig) -> dict:
        payload = {
            "model": self.cfg.model,
            "messages": self.chat.to_messages(request.prompt_ids, list(request.images)),
            "max_tokens": max_new_tokens(request, sampling),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.top_k > 0:
            payload["top_k"] = sampling.top_k  # an extension of vLLM's server; others ignore or reject it
        if request.seed is not None:
            payload["seed"] = request.seed
        return payload

    def _one(self, request: GenerationRequest, sampling: SamplingConfig) -> Generation:
        try:
            payload = self.payload(request, sampling)
        except (ValueError, OSError) as err:  # this request's ids or images: the others of the batch go on
            return Generation([], [], "error", error=f"the request could not be sent: {err}")
        done = self._api.complete(payload, self._retries)
        if done.status != OK:
            return Generation([], [], "error", error=f"{done.status}: {done.detail}")
        limit = max_new_tokens(request, sampling)
        ids = self.literal_ids(done.content)
        if done.finish_reason == "length" or len(ids) >= limit:  # our tokenizer may count more than the server's
            ids, finish = ids[:limit], "length"
        else:
            ids, finish = ids + [self.stop_token_ids[0]], "stop"
        return Generation(ids, [0.0] * len(ids), finish)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        raise NotImplementedError("an endpoint engine serves someone else's weights: it cannot take new ones")

    def close(self) -> None:
        self._api.close()
