"""SFT data: expert trajectories of the questions with an answer box, and lone crop turns whose box mixes the x
pair of one expert box with the y pair of another."""

import dataclasses

import pytest

from tests.rollout.conftest import TINY_BUDGET
from vrag_rl.agent.actions import parse_action
from vrag_rl.data.records import load_qa
from vrag_rl.job.sft import ExpertData
from vrag_rl.rollout.agent_loop import AgentConfig


@pytest.fixture(scope="module")
def data(bundled_corpus, encoder):
    records = load_qa(bundled_corpus)[:12]
    return ExpertData(records, bundled_corpus, encoder, AgentConfig(budget=TINY_BUDGET), progress=False)


def test_one_expert_per_question_with_a_box(data, bundled_corpus):
    usable = [r for r in load_qa(bundled_corpus)[:12] if r.answer_box is not None]
    assert len(data.trajectories) == len(usable) == len(data.crops)
    assert all(t.images and sum(t.response_mask) for t in data.trajectories)


def test_batches_hold_experts_then_lone_crops(data, encoder):
    batch = next(data.batches(batch_size=3, crop_batch_size=5, seed=0))
    assert len(batch) == 8
    assert all(t.images for t in batch[:3])
    boxes = {tuple(int(v) for v in a.bbox) for a, _ in data.crops}
    for lone in batch[3:]:
        assert not lone.images and lone.input_ids[: len(encoder.assistant_header_ids)] == encoder.assistant_header_ids
        text = encoder.tokenizer.decode(lone.input_ids[len(encoder.assistant_header_ids) :])
        action = parse_action(text.removesuffix("<|im_end|>"))
        x1, y1, x2, y2 = (int(v) for v in action.bbox)
        assert any((x1, x2) == (b[0], b[2]) for b in boxes) and any((y1, y2) == (b[1], b[3]) for b in boxes)
        assert sum(lone.response_mask) == len(lone.input_ids) - len(encoder.assistant_header_ids)


def test_batches_are_seeded(data):
    a, b = next(data.batches(2, 4, seed=7)), next(data.batches(2, 4, seed=7))
    assert [t.input_ids for t in a] == [t.input_ids for t in b]


def test_no_usable_question_is_an_error(bundled_corpus, encoder):
    bare = [dataclasses.replace(r, answer_box=None) for r in load_qa(bundled_corpus)[:2]]
    with pytest.raises(ValueError, match="answer box"):
        ExpertData(bare, bundled_corpus, encoder, AgentConfig(), progress=False)
