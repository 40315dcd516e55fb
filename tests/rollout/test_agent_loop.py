"""The agent loop's protocol, driven through chosen actions by a scripted engine over the real retriever, under
both loops (``agent.loop``: per trajectory and turn-synchronous)."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.rollout.conftest import TINY_BUDGET, image_token_count
from vrag_rl.agent.images import crop_region, page_view
from vrag_rl.agent.prompt import ANSWER_NOW_FEEDBACK, INVALID_ACTION_FEEDBACK
from vrag_rl.rollout.agent_loop import LOOPS, NO_NEW_PAGE_FEEDBACK, AgentConfig, AgentLoop
from vrag_rl.rollout.engine import SamplingConfig
from vrag_rl.rollout.records import Task, make_groups

Q1, Q2 = "Which city hosts the research centre?", "What share of the market does it hold?"
GREEDY = SamplingConfig(temperature=0.0, max_tokens=256)


@pytest.fixture(params=LOOPS)
def run(request):
    def run(engine, encoder, retriever, tasks, **agent):
        cfg = AgentConfig(budget=TINY_BUDGET, loop=request.param, **{"max_length": 4096, **agent})
        return AgentLoop(engine, encoder, retriever, cfg).run(tasks, GREEDY)

    return run


def decoded_observations(encoder, trajectory) -> list[str]:
    return [encoder.tokenizer.decode(s.ids) for s in trajectory.segments if s.role == "observation"]


def test_search_crop_answer(run, scripted, encoder, retriever):
    box = [10, 20, 110, 90]
    engine = scripted(
        {
            Q1: [
                "<think>find it</think><search>alpha report</search>",
                f"<think>zoom</think><bbox>{box}</bbox>",
                "<think>done</think><answer>Lyon</answer>",
            ]
        }
    )
    (r,) = run(engine, encoder, retriever, [Task("q1", Q1)])
    best = retriever.search(["alpha report"], top_k=1)[0][0].page_id
    assert r.retrieved_pages == [best]
    assert [a.kind for a in r.actions] == ["search", "bbox", "answer"]
    assert r.answer == "Lyon" and r.finished and r.stop_reason == "answer" and r.num_invalid == 0
    # The crop is the box in the frame of the page as shown, mapped to the raw page.
    with Image.open(retriever.page_path(best)) as raw:
        view = page_view(best, raw.size, TINY_BUDGET)
    assert r.crops == [(best, crop_region(view, box))]
    t = r.trajectory
    assert len(t.images) == 2 and t.images[0].size == view.shown_size
    assert t.input_ids.count(encoder.image_token_id) == image_token_count(t)
    # Token-in/token-out: the model segments are exactly the engine's ids, with their log-probs, masked in.
    model_ids = [i for s in t.segments if s.role == "model" for i in s.ids]
    assert all(x.endswith("<|im_end|>") for x in r.texts)
    sampled = [i for x in r.texts for i in encoder.tokenizer(x, add_special_tokens=False)["input_ids"]]
    assert model_ids == sampled and sum(t.response_mask) == len(model_ids)
    assert [lp for lp in t.sampled_logprobs if lp is not None] == [-0.5] * len(model_ids)
    # Each request was the whole trajectory so far, images included.
    assert [len(q.images) for q in engine.requests] == [0, 1, 2]


def test_batched_search_and_unseen_pages(run, scripted, encoder, retriever):
    engine = scripted(
        {
            Q1: ["<search>alpha report</search>", "<search>alpha report</search>", "<answer>x</answer>"],
            Q2: ["<search>beta chart</search>", "<answer>y</answer>"],
        }
    )
    r1, r2 = run(engine, encoder, retriever, [Task("q1", Q1), Task("q2", Q2)])
    ranked = [h.page_id for h in retriever.search(["alpha report"], top_k=2)[0]]
    assert r1.retrieved_pages == ranked  # the same query twice shows the next page, not the same one again
    assert r2.retrieved_pages == [retriever.search(["beta chart"], top_k=1)[0][0].page_id]
    assert r1.num_turns == 3 and r2.num_turns == 2


def test_no_unseen_page_left(run, scripted, encoder, retriever):
    n = len(retriever.page_ids)
    engine = scripted({Q1: ["<search>alpha</search>"] * (n + 1) + ["<answer>x</answer>"]})
    (r,) = run(engine, encoder, retriever, [Task("q1", Q1)], max_turns=n + 1, max_length=200_000)
    assert sorted(r.retrieved_pages) == sorted(retriever.page_ids)
    assert NO_NEW_PAGE_FEEDBACK in decoded_observations(encoder, r.trajectory)[-1]
    assert r.finished


def test_invalid_actions_get_feedback(run, scripted, encoder, retriever):
    engine = scripted(
        {
            Q1: [
                "no tags at all",
                "<bbox>[1, 2, 30, 40]</bbox>",
                "<search>alpha</search>",
                "<bbox>[5000, 5000, 6000, 6000]</bbox>",
                "<answer>x</answer>",
            ]
        }
    )
    (r,) = run(engine, encoder, retriever, [Task("q1", Q1)], max_turns=5)
    # no tag; a crop before any image; a box outside the shown page: three invalid actions, each answered
    assert r.num_invalid == 3 and r.finished and r.crops == []
    obs = decoded_observations(encoder, r.trajectory)
    assert [INVALID_ACTION_FEEDBACK in o for o in obs] == [True, True, False, True]
    assert [a.kind for a in r.actions] == ["invalid", "bbox", "search", "bbox", "answer"]


def test_turn_limit_then_answer_only(run, scripted, encoder, retriever):
    engine = scripted(
        {
            Q1: ["<search>alpha</search>", "<search>beta</search>", "<search>gamma</search>"],
            Q2: ["<search>alpha</search>", "<search>beta</search>", "<answer>late</answer>"],
        }
    )
    r1, r2 = run(engine, encoder, retriever, [Task("q1", Q1), Task("q2", Q2)], max_turns=2)
    assert ANSWER_NOW_FEEDBACK in decoded_observations(encoder, r1.trajectory)[-1]
    assert r1.stop_reason == "turn_limit" and not r1.finished and r1.num_turns == 3
    assert r1.actions[-1].kind == "invalid" and r1.num_invalid == 1  # a search is not allowed in the final turn
    assert len(r1.retrieved_pages) == 2
    assert r2.finished and r2.answer == "late"


def test_length_limit_never_cuts_an_image(run, scripted, encoder, retriever):
    engine = scripted({Q1: ["<search>alpha</search>", "<answer>x</answer>"]})
    prompt_len = len(
        run(scripted({Q1: ["<answer>x</answer>"]}), encoder, retriever, [Task("q1", Q1)])[0].trajectory.segments[0].ids
    )
    (r,) = run(engine, encoder, retriever, [Task("q1", Q1)], max_length=prompt_len + 40)
    t = r.trajectory
    assert r.stop_reason == "length" and t.truncated and len(t) <= prompt_len + 40
    assert t.images == [] and encoder.image_token_id not in t.input_ids  # the page did not fit: nothing of it
    assert [s.role for s in t.segments] == ["prompt", "model"]


def test_turn_cut_by_token_limit_is_closed(scripted, encoder, retriever):
    long_turn = "<think>" + "very long thought " * 30 + "</think><search>alpha</search>"
    engine = scripted({Q1: [long_turn, "<answer>x</answer>"]})
    cfg = AgentConfig(budget=TINY_BUDGET, max_length=4096)
    (r,) = AgentLoop(engine, encoder, retriever, cfg).run([Task("q1", Q1)], SamplingConfig(0.0, max_tokens=16))
    assert r.actions[0].kind == "invalid"  # the cut turn has no complete tag
    model, obs = r.trajectory.segments[1], r.trajectory.segments[2]
    assert len(model.ids) == 16 and model.ids[-1] != encoder.eos_token_id
    assert obs.ids[0] == encoder.eos_token_id  # the template closes the cut turn, outside the response mask


def test_groups_and_seeds():
    tasks = make_groups([("a", "qa"), ("b", "qb")], n=3, seed=7)
    assert [(t.group, t.sample) for t in tasks] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert len({t.seed for t in tasks}) == 6 and tasks == make_groups([("a", "qa"), ("b", "qb")], n=3, seed=7)
    assert make_groups([("a", "qa")], 2, seed=8)[0].seed != tasks[0].seed
    assert all(t.seed is None for t in make_groups([("a", "qa")], 2, seed=None))
    assert make_groups([("a", "qa")], 1, seed=0, first_group=5)[0].group == 5


def test_a_page_that_cannot_be_shown_is_passed_over(run, scripted, encoder, retriever, tmp_path):
    """A strip beyond the vision processor's aspect-ratio limit, and an unreadable file, in a retriever's
    results: the search shows the next page instead, and the trajectory goes on."""
    from vrag_rl.retrieval.types import Hit

    Image.new("RGB", (4100, 10), "white").save(tmp_path / "strip.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    good = retriever.page_ids[0]
    files = {"strip_1": tmp_path / "strip.jpg", "broken_1": tmp_path / "broken.jpg", good: retriever.page_path(good)}

    class Results:  # the retriever's interface, answering with the two bad pages first
        def search(self, queries, top_k=5, mode="visual"):
            return [[Hit(pid, 1.0, str(path)) for pid, path in files.items()] for _ in queries]

        def page_path(self, page_id):
            return files[page_id]

    engine = scripted({Q1: ["<search>anything</search>", "<bbox>[0, 0, 50, 50]</bbox>", "<answer>x</answer>"]})
    (r,) = run(engine, encoder, Results(), [Task("q1", Q1)])
    assert r.retrieved_pages == [good] and len(r.crops) == 1 and r.num_invalid == 0 and r.finished
