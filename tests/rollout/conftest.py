"""Rollout fixtures: the tiny policy's chat encoder, a scripted engine, the bundled corpus's retriever."""

from __future__ import annotations

import pytest
import torch

from vrag_rl.models.tiny import TINY_BUDGET  # noqa: F401 (the tests' budget, imported from here)
from vrag_rl.rollout.engine import Generation, GenerationRequest, RolloutEngine, SamplingConfig, max_new_tokens


class ScriptedEngine(RolloutEngine):
    """Replays assistant texts: ``scripts`` maps a question to its turns; the question is found in the
    request's prompt and the turn number is the number of assistant headers in it. It stands in for a
    policy so that tests can drive the agent loop through chosen actions; the engines themselves are
    tested against each other elsewhere. A question scripted as None is refused: a batch holding its request
    raises ``ValueError``, as an engine does on a request it cannot take."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]]):
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.stop_token_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self.requests: list[GenerationRequest] = []
        self.batches: list[int] = []  # the size of each generate call

    def find(self, request: GenerationRequest) -> tuple[str, int]:
        """The scripted question a request is about, and which of its turns it asks for."""
        text = self.tokenizer.decode(request.prompt_ids)
        found = [q for q in self.scripts if q in text]
        assert len(found) == 1, f"the prompt holds {len(found)} of the scripted questions"
        return found[0], text.count("<|im_start|>assistant") - 1

    def generate(self, requests: list[GenerationRequest], sampling: SamplingConfig) -> list[Generation]:
        self.batches.append(len(requests))
        out = []
        for r in requests:
            self.requests.append(r)
            question, turn = self.find(r)
            if self.scripts[question] is None:
                raise ValueError(f"the engine cannot take the request of {question!r}")
            ids = self.tokenizer(self.scripts[question][turn] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            limit = max_new_tokens(r, sampling)
            finish = "stop" if len(ids) <= limit else "length"
            ids = ids[:limit]
            out.append(Generation(ids, [-0.5] * len(ids), finish))
        return out

    def update_weights(self, named_tensors) -> int:
        return sum(t.numel() * t.element_size() for _, t in named_tensors)


@pytest.fixture(scope="session")
def retriever(bundled_corpus, bundled_index, embedder):
    from vrag_rl.retrieval.local import LocalRetriever

    return LocalRetriever(bundled_corpus, bundled_index, embedder)


@pytest.fixture
def scripted(tiny_processor):
    return lambda scripts: ScriptedEngine(tiny_processor.tokenizer, scripts)


def image_token_count(trajectory) -> int:
    return sum(t * h * w // 4 for t, h, w in trajectory.image_grid_thw)


def recompute_logprobs(model, trajectory, encoder, temperature: float = 1.0) -> torch.Tensor:
    """The training forward's log-probs over a whole trajectory, under the engines' sampling distribution."""
    from vrag_rl.models.forward import banned_token_ids, token_logprobs

    with torch.no_grad():
        inputs = trajectory.model_inputs(encoder.image_token_id)
        return token_logprobs(model, inputs, temperature, banned_token_ids(encoder.tokenizer))[0]


class SteppedEngine(ScriptedEngine):
    """A scripted engine that batches continuously, as vLLM does: a turn finishes ``steps[question][turn]``
    scheduler steps (``advance`` calls, ``step_s`` seconds each, as a decode step takes) after it was added,
    whatever else runs. ``finished`` records each turn's (question, turn, step) in the order they finished."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]], steps: dict[str, list[int]], step_s: float = 0.02):
        super().__init__(tokenizer, scripts)
        self.steps, self.step_s = steps, step_s
        self.clock = 0
        self.finished: list[tuple[str, int, int]] = []
        self.aborted: list[tuple[str, int, int]] = []
        self._under_way: list[list] = []  # [steps left, key, generation, question, turn]

    def advance(self, new, sampling):
        import time

        from vrag_rl.rollout.engine import refused

        time.sleep(self.step_s)
        self.clock += 1
        done = []
        for key, r in new:
            question, turn = self.find(r)
            try:
                (gen,) = self.generate([r], sampling)
            except ValueError as err:
                done.append((key, refused(err)))
                continue
            self._under_way.append([self.steps[question][turn], key, gen, question, turn])
        for item in list(self._under_way):
            item[0] -= 1
            if item[0] == 0:
                self._under_way.remove(item)
                done.append((item[1], item[2]))
                self.finished.append((item[3], item[4], self.clock))
        return done

    @property
    def running(self) -> int:
        return len(self._under_way)

    def abort(self, key) -> None:
        for item in [item for item in self._under_way if item[1] is key]:
            self._under_way.remove(item)
            self.aborted.append((item[3], item[4], self.clock))
