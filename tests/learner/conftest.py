"""Scripted trajectories for the trainer's tests."""

import pytest

from tests.rollout.conftest import TINY_BUDGET
from vrag_rl.data.expert import load_page, scripted_trajectory
from vrag_rl.data.records import load_qa


@pytest.fixture(scope="module")
def trajectories(bundled_corpus, encoder):
    """Two questions x four variants; "no_search" has no image at all."""
    out = []
    for record in [r for r in load_qa(bundled_corpus) if r.answer_box is not None][:2]:
        page = load_page(bundled_corpus, record.answer_box[0])
        for variant in ("expert", "no_crop", "wrong_answer", "no_search"):
            out.append(scripted_trajectory(record, page, encoder, variant, budget=TINY_BUDGET).trajectory)
    assert any(not t.images for t in out)
    return out
