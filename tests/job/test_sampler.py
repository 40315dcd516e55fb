"""The epoch sampler: every index once per epoch, a fresh order each epoch, and a position that resumes."""

import pytest

from vrag_rl.job.sampler import EpochSampler


def test_each_index_once_per_epoch_in_a_new_order():
    s = EpochSampler(7, seed=3)
    first, second = s.take(7), s.take(7)
    assert sorted(first) == sorted(second) == list(range(7))
    assert first != second
    assert s.state() == {"epoch": 1, "pos": 7}


def test_takes_across_epoch_boundaries_like_one_stream():
    whole = EpochSampler(5, seed=0).take(23)
    parts = EpochSampler(5, seed=0)
    assert sum((parts.take(k) for k in (3, 4, 9, 7)), []) == whole


def test_restored_position_continues_the_stream():
    straight = EpochSampler(6, seed=1)
    straight.take(8)
    resumed = EpochSampler(6, seed=1)
    resumed.restore(straight.state())
    assert resumed.take(10) == straight.take(10)


def test_seed_changes_the_order_and_empty_is_refused():
    assert EpochSampler(9, seed=0).take(9) != EpochSampler(9, seed=1).take(9)
    with pytest.raises(ValueError):
        EpochSampler(0, seed=0)
