"""Any model output is at worst an invalid action: random and adversarial turns through the real agent loop.

A seeded engine answers every request with a turn drawn from a mixture: boxes with huge, NaN, infinite,
negative, swapped, non-numeric or wrongly counted coordinates; nested, unclosed and repeated tags; empty and
replacement-character searches; random tag soup; turns cut by the token limit; megabyte strings. The loop
(the real parser, crop geometry, image budget, feedback turns, the bundled corpus's retriever in every
search mode) must run them all without an exception and keep its records consistent.
"""

from __future__ import annotations

import random

import pytest
from PIL import Image

from tests.rollout.conftest import TINY_BUDGET
from vrag_rl.agent.actions import ActionKind
from vrag_rl.rollout.agent_loop import AgentConfig, AgentLoop
from vrag_rl.rollout.engine import Generation, RolloutEngine, SamplingConfig, max_new_tokens
from vrag_rl.rollout.records import StopReason, make_groups

NUMBERS = ["1.7e308", "-1.7e308", "1e309", "-1e309", "nan", "NaN", "inf", "-inf", "0", "-0", "-5", "12", "3.5"]
NUMBERS += ["1e-320", "99999999999999999999", "1_000", "١٢", "0x10", "", " ", "7e", "--1", "+3", "1,5", "∞"]
TAGS = ["<think>", "</think>", "<search>", "</search>", "<bbox>", "</bbox>", "<answer>", "</answer>", "<|im_end|>"]
PIECES = ["[", "]", ",", " ", "\ufffd", "\x00", "é", "報告", "\n", "<", ">", "/", "bbox", "search", "0", "9"]


def number(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(NUMBERS)
    return repr(rng.choice([-1, 1]) * 10 ** rng.uniform(-5, 308))


def soup(rng: random.Random, n: int) -> str:
    return "".join(
        rng.choice(TAGS + PIECES) if rng.random() < 0.6 else chr(rng.randrange(32, 0x3000)) for _ in range(n)
    )


def turn(rng: random.Random) -> str:
    """One assistant turn of the mixture (answers are rare, so trajectories live through every state)."""
    kind = rng.random()
    think = f"<think>{soup(rng, rng.randrange(8))}</think>" if rng.random() < 0.5 else ""
    if kind < 0.15:  # a sensible box, so crops and crops of crops happen
        x, y = rng.randrange(0, 300), rng.randrange(0, 300)
        return think + f"<bbox>[{x}, {y}, {x + rng.randrange(8, 200)}, {y + rng.randrange(8, 200)}]</bbox>"
    if kind < 0.3:  # boxes, valid or not
        nums = [
            number(rng) if rng.random() < 0.4 else str(rng.randrange(-50, 700))
            for _ in range(rng.choice([4] * 6 + [3, 5]))
        ]
        body = ", ".join(nums)
        body = rng.choice([f"[{body}]", body, f"[[{body}]]", f"({body})", f"[{body}"])
        return think + f"<bbox>{body}</bbox>"
    if kind < 0.48:  # searches: words, nothing, replacement characters, other tags inside
        query = rng.choice(["revenue table", "", "\ufffd" * rng.randrange(1, 50), soup(rng, 20), "<answer>x</answer>"])
        return think + f"<search>{query}</search>"
    if kind < 0.52:
        return think + f"<answer>{rng.choice(['', 'Lyon', soup(rng, 10)])}</answer>"
    if kind < 0.62:  # unclosed, repeated, nested
        return rng.choice(
            [
                "<bbox>[1, 2, 30, 40]",
                "<search>a</search>" * rng.randrange(2, 5),
                "<search><bbox>[1,2,3,4]</bbox></search>",
                "<answer>",
                "<think>" * 30,
            ]
        )
    if kind < 0.67:  # long numbers and long queries
        return rng.choice(
            [f"<bbox>[{'9' * rng.randrange(60, 5000)}, 0, 1, 1]</bbox>", f"<search>{'x' * 5000}</search>"]
        )
    return soup(rng, rng.randrange(1, 60))


class FuzzEngine(RolloutEngine):
    """Answers every request with a turn of the mixture (``turn``), some cut short by the token limit."""

    def __init__(self, tokenizer, seed: int, turns=turn):
        self.tokenizer, self.rng, self.turns = tokenizer, random.Random(seed), turns
        self.stop_token_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self.outputs = 0

    def generate(self, requests, sampling: SamplingConfig) -> list[Generation]:
        out = []
        for r in requests:
            text = self.turns(self.rng)
            ended = self.rng.random() < 0.9
            ids = self.tokenizer(text + ("<|im_end|>" if ended else ""), add_special_tokens=False)["input_ids"]
            limit = max_new_tokens(r, sampling)
            finish = "stop" if ended and len(ids) <= limit else "length"
            ids = (ids or self.stop_token_ids)[:limit]
            out.append(Generation(ids, [-1.0] * len(ids), finish))
            self.outputs += 1
        return out

    def update_weights(self, named_tensors) -> int:
        raise NotImplementedError


def check(rollouts, cfg: AgentConfig, retriever) -> None:
    for r in rollouts:
        t = r.trajectory
        assert r.stop_reason in set(StopReason)
        assert len(t) <= cfg.max_length and len(t.response_mask) == len(t.input_ids)
        invalid = sum(a.kind == ActionKind.INVALID for a in r.actions)
        assert invalid <= r.num_invalid <= len(r.actions)
        assert len(set(r.retrieved_pages)) == len(r.retrieved_pages)
        assert len(t.images) == len(r.retrieved_pages) + len(r.crops)
        for page, (x0, y0, x1, y1) in r.crops:
            with Image.open(retriever.page_path(page)) as im:
                assert 0 <= x0 < x1 <= im.width and 0 <= y0 < y1 <= im.height


@pytest.mark.slow  # 10,000 turns through the agent loop: minutes on 2 cores
def test_ten_thousand_adversarial_turns_run_without_an_exception(encoder, retriever, bundled_corpus):
    sampling = SamplingConfig(temperature=1.0, max_tokens=256)
    outputs, rollouts = 0, []
    for seed, mode in enumerate(["visual", "text", "hybrid", "visual", "text"]):
        length = 1200 if seed % 2 else 4096  # a short context in some runs, so trajectories also stop for length
        cfg = AgentConfig(
            max_turns=5, max_length=length, search_mode=mode, crop_padding=0.1 * (seed % 2), budget=TINY_BUDGET
        )
        engine = FuzzEngine(encoder.tokenizer, seed)
        tasks = make_groups([(f"q{i}", f"Question {i} about the report?") for i in range(100)], 4, seed=seed)
        batch = AgentLoop(engine, encoder, retriever, cfg).run(tasks, sampling)
        check(batch, cfg, retriever)
        outputs += engine.outputs
        rollouts += batch
    assert outputs >= 10_000
    # Every state was reached: a crop before any image, a crop of a crop, a search after a crop, every ending but a
    # timeout (no turn or search here is slow: rollout/test_turns.py times them out).
    kinds = [[a.kind for a in r.actions] for r in rollouts]
    assert any(k and k[0] == ActionKind.BBOX for k in kinds)
    assert any(len(r.crops) >= 2 for r in rollouts)
    assert any(r.crops and ActionKind.SEARCH in k[k.index(ActionKind.BBOX) :] for r, k in zip(rollouts, kinds))
    assert {r.stop_reason for r in rollouts} == set(StopReason) - {StopReason.TIMEOUT}


def test_megabyte_turns(encoder, retriever):
    huge = [
        "<bbox>[" + "9" * 1_000_000 + ", 0, 1, 1]</bbox>",
        "<search>" + "\ufffd" * 350_000 + "</search>",  # 1 MB of UTF-8
        "<think>" + "<search>" * 200_000 + "</think>",
        "<answer>" + "a " * 500_000 + "</answer>",
    ]
    order = iter(["<search>revenue</search>", *huge, "<bbox>[1e308, -1e308, 1.7e308, 1e308]</bbox>"] * 2)
    cfg = AgentConfig(max_turns=6, max_length=1 << 22, budget=TINY_BUDGET)
    engine = FuzzEngine(encoder.tokenizer, 0, turns=lambda _: next(order))
    (r,) = AgentLoop(engine, encoder, retriever, cfg).run(
        make_groups([("q", "Where?")], 1, 0), SamplingConfig(max_tokens=1 << 22)
    )
    check([r], cfg, retriever)
    assert [a.kind for a in r.actions][:5] == ["search", "invalid", "search", "invalid", "answer"]
    assert r.stop_reason == StopReason.ANSWER
