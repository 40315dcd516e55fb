"""Rollout engine over any OpenAI-compatible chat endpoint serving a VLM (``vllm serve EXPORT``, an API model).

The agent loop stays token-in/token-out: it keeps the trajectory in the ids of a local processor (the chat
template of ``processor_dir``) and asks this engine for the next assistant turn. The engine turns the
request's ids back into chat messages (the template's ``<|im_start|>ROLE ... <|im_end|>`` turns; every
``<|vision_start|><|image_pad|>...<|vision_end|>`` run becomes the next of the request's images, sent inline
as a PNG data URL at the size it was shown), sends them to ``POST {base_url}/chat/completions`` and returns
the reply tokenized by the local tokenizer. Crop boxes therefore refer to the image as the endpoint saw it.

The endpoint's own log-probs are of its tokenizer's ids, not ours: this engine reports 0.0 for each token and
is for evaluation and serving, never for training (``update_weights`` refuses). A request that fails after
the bounded retries of ``chat_api`` becomes an empty turn with ``Generation.error`` set: the agent loop counts
it and treats it as an invalid action, so one dead endpoint never ends an evaluation.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from PIL import Image

from vrag_rl.chat_api import OK, ChatAPI, Retries, api_key_from_env
from vrag_rl.rollout.engine import Generation, GenerationRequest, RolloutEngine, SamplingConfig, max_new_tokens

_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>\n?|\Z)", re.DOTALL)
_IMAGE = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>")


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


def to_messages(text: str, images: list[Image.Image]) -> list[dict]:
    """Chat messages of a rendered conversation (special tokens kept); the final empty assistant header, the
    turn to generate, is dropped. Images fill the vision placeholders in order."""
    pending = iter(images)
    messages = []
    for role, body in _TURN.findall(text):
        parts, start = [], 0
        for m in _IMAGE.finditer(body):
            if body[start : m.start()]:
                parts.append({"type": "text", "text": body[start : m.start()]})
            image = next(pending, None)
            if image is None:
                raise ValueError("the request holds more image placeholders than images")
            parts.append({"type": "image_url", "image_url": {"url": data_url(image)}})
            start = m.end()
        if body[start:]:
            parts.append({"type": "text", "text": body[start:]})
        if all(p["type"] == "text" for p in parts):
            messages.append({"role": role, "content": "".join(p["text"] for p in parts)})
        else:
            messages.append({"role": role, "content": parts})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


class EndpointEngine(RolloutEngine):
    def __init__(self, processor_dir: str, cfg: EndpointConfig):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(processor_dir)
        self.stop_token_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self._api = ChatAPI(cfg.base_url, cfg.api_key(), cfg.timeout_s, cfg.max_in_flight, cfg.max_response_bytes)
        self._retries = Retries(cfg.max_retries)

    def generate(self, requests: list[GenerationRequest], sampling: SamplingConfig) -> list[Generation]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.max_in_flight, len(requests))) as pool:
            return list(pool.map(lambda r: self._one(r, sampling), requests))

    def payload(self, request: GenerationRequest, sampling: SamplingConfig) -> dict:
        text = self.tokenizer.decode(request.prompt_ids, skip_special_tokens=False)
        payload = {
            "model": self.cfg.model,
            "messages": to_messages(text, list(request.images)),
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
        done = self._api.complete(self.payload(request, sampling), self._retries)
        if done.status != OK:
            return Generation([], [], "error", error=f"{done.status}: {done.detail}")
        limit = max_new_tokens(request, sampling)
        ids = self.tokenizer(done.content, add_special_tokens=False)["input_ids"]
        if done.finish_reason == "length" or len(ids) >= limit:  # our tokenizer may count more than the server's
            ids, finish = ids[:limit], "length"
        else:
            ids, finish = ids + [self.stop_token_ids[0]], "stop"
        return Generation(ids, [0.0] * len(ids), finish)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        raise NotImplementedError("an endpoint engine serves someone else's weights: it cannot take new ones")

    def close(self) -> None:
        self._api.close()
