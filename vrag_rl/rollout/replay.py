"""Recorded trajectories replayed through the agent loop: the trajectory a policy would be trained on.

A recording is what an evaluation row keeps of a trajectory: the question, every assistant turn as text and
the pages its searches showed (``views``). Replaying it runs the real agent loop (prompt, parser, image
budget, crop geometry, feedback turns) with an engine that returns the recorded turns and a retriever that
returns the recorded pages, so the result holds exactly the ids and images the agent saw. Teacher
trajectories (a large model run through the evaluation harness) become supervised data this way
(``trainer.sft``). A recorded turn is text, as an endpoint's reply is: it is tokenized with special-token markup
split (``agent.chat.LiteralText``), all but the end-of-turn token that closes it, so markup a teacher wrote
(an image placeholder) never becomes a special token of the trajectory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from vrag_rl.agent.actions import ACTION_KINDS, END_OF_TURN_TOKENS, ActionKind, parse_action
from vrag_rl.agent.chat import ChatEncoder
from vrag_rl.retrieval.base import PageCatalog
from vrag_rl.retrieval.types import Hit
from vrag_rl.rollout.agent_loop import AgentConfig, AgentLoop
from vrag_rl.rollout.engine import Generation, GenerationRequest, RolloutEngine, SamplingConfig
from vrag_rl.rollout.records import Rollout, Task


@dataclass(frozen=True)
class Recording:
    qid: str
    question: str
    texts: list[str]  # assistant turns as decoded, special tokens included
    views: list[list]  # [turn, page id, raw box or None] of what searches and crops showed


class _ScriptedEngine(RolloutEngine):
    """Returns the recorded turns of one trajectory, in order."""

    def __init__(self, encoder: ChatEncoder, texts: list[str]):
        self.encoder, self.texts = encoder, list(texts)
        self.stop_token_ids = [encoder.tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS]

    def generate(self, requests: list[GenerationRequest], sampling: SamplingConfig) -> list[Generation]:
        if len(requests) != 1 or not self.texts:
            raise RuntimeError("the recording has no turn left for this request")
        text = self.texts.pop(0)
        stop = next((t for t in END_OF_TURN_TOKENS if text.endswith(t)), None)
        ids = self.encoder.literal_ids(text.removesuffix(stop) if stop else text)
        ids += [self.encoder.tokenizer.convert_tokens_to_ids(stop)] if stop else []
        return [Generation(ids, [0.0] * len(ids), "stop" if stop else "length")]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        raise NotImplementedError("a recording has no weights")


class _RecordedSearch:
    """Returns, for the k-th search of the trajectory, the page the recording shows after it (none: no page)."""

    def __init__(self, catalog: PageCatalog, recording: Recording):
        self.catalog = catalog
        searches = [
            t for t, text in enumerate(recording.texts) if parse_action(text, ACTION_KINDS).kind == ActionKind.SEARCH
        ]
        pages = {turn: page for turn, page, box in recording.views if box is None}
        self.pages = [pages.get(t) for t in searches]

    def search(self, queries: list[str], top_k: int, mode: str) -> list[list[Hit]]:
        page = self.pages.pop(0)
        return [[Hit(page, 1.0, str(self.catalog.page_path(page)))] if page else [] for _ in queries]

    def page_path(self, page_id: str):
        return self.catalog.page_path(page_id)


def replay(recording: Recording, catalog: PageCatalog, encoder: ChatEncoder, cfg: AgentConfig) -> Rollout:
    """The rollout of ``recording`` under ``cfg``; its texts must parse to the same actions as when recorded."""
    engine = _ScriptedEngine(encoder, recording.texts)
    loop = AgentLoop(engine, encoder, _RecordedSearch(catalog, recording), cfg)
    rollout = loop.run([Task(recording.qid, recording.question)], SamplingConfig(temperature=0.0))[0]
    if rollout.texts != recording.texts or _plain(rollout.views) != _plain(recording.views):
        raise ValueError(
            f"{recording.qid}: the replay did not show what was recorded: record and replay with the same agent "
            "settings (image budget, turn limit, context length)"
        )
    return rollout


def _plain(views) -> list:
    return [[int(turn), page, None if box is None else [int(v) for v in box]] for turn, page, box in views]
