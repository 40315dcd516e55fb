"""Expert and flawed scripted trajectories through the real protocol."""

import pytest
from PIL import ImageOps

from vrag_rl.agent.chat import ChatEncoder
from vrag_rl.data.expert import VARIANTS, load_page, scripted_trajectory
from vrag_rl.data.records import load_qa
from vrag_rl.models.tiny import TINY_BUDGET as BUDGET


@pytest.fixture(scope="module")
def records(bundled_corpus):
    return [r for r in load_qa(bundled_corpus) if r.answer_box is not None]


def test_expert_searches_crops_the_printed_answer_and_answers(records, bundled_corpus, tiny_processor):
    encoder = ChatEncoder(tiny_processor)
    categories = sorted({r.category for r in records})
    assert len(categories) >= 3
    for record in [r for c in categories for r in records if r.category == c][::2]:
        page = load_page(bundled_corpus, record.answer_box[0])
        s = scripted_trajectory(record, page, encoder, "expert", budget=BUDGET)
        assert [a.kind for a in s.actions] == ["search", "bbox", "answer"]
        assert s.retrieved_pages == record.gold_pages[:1] and s.answer == record.answer
        ((page_id, (cx0, cy0, cx1, cy1)),) = s.crops
        _, x0, y0, x1, y1 = record.answer_box
        assert page_id == record.answer_box[0] and cx0 <= x0 and cy0 <= y0 and cx1 >= x1 and cy1 >= y1
        # the crop is a zoom: the shown crop is larger than its raw region, and it holds ink (the answer)
        shown_crop = s.trajectory.images[1]
        assert shown_crop.width > cx1 - cx0 and shown_crop.height > cy1 - cy0
        assert ImageOps.grayscale(shown_crop).getextrema()[0] < 100
        assert s.trajectory.num_model_turns == 3 and len(s.trajectory.images) == 2


def test_variants_differ_as_scripted(records, bundled_corpus, tiny_processor):
    encoder = ChatEncoder(tiny_processor)
    record = records[0]
    page = load_page(bundled_corpus, record.answer_box[0])
    runs = {v: scripted_trajectory(record, page, encoder, v, budget=BUDGET, wrong_answer="nope") for v in VARIANTS}
    assert [a.kind for a in runs["invalid_first"].actions] == ["invalid", "search", "bbox", "answer"]
    assert runs["wrong_answer"].answer == "nope"
    assert not runs["no_search"].retrieved_pages and not runs["no_search"].trajectory.images
    assert not runs["no_crop"].crops and len(runs["no_crop"].trajectory.images) == 1
    with pytest.raises(ValueError):
        scripted_trajectory(record, page, encoder, "teleport", budget=BUDGET)


def test_length_limit_stops_a_scripted_trajectory(records, bundled_corpus, tiny_processor):
    encoder = ChatEncoder(tiny_processor)
    record = records[0]
    page = load_page(bundled_corpus, record.answer_box[0])
    full = scripted_trajectory(record, page, encoder, "expert", budget=BUDGET)
    cut = scripted_trajectory(record, page, encoder, "expert", budget=BUDGET, max_length=len(full.trajectory) - 30)
    assert cut.trajectory.truncated and cut.answer is None and len(cut.trajectory) < len(full.trajectory)
    assert cut.trajectory.input_ids == full.trajectory.input_ids[: len(cut.trajectory)]
