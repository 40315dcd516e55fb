"""Reciprocal rank fusion: hand-computed cases, tie rules, validation and properties."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vrag_rl.retrieval.fusion import reciprocal_rank_fusion as rrf


def test_hand_computed_two_rankings():
    fused = rrf([["a", "b", "c"], ["c", "a"]], k=60)
    assert [p for p, _ in fused] == ["a", "c", "b"]
    expected = {"a": 1 / 61 + 1 / 62, "c": 1 / 63 + 1 / 61, "b": 1 / 62}
    assert fused == [(p, pytest.approx(expected[p], rel=1e-15)) for p in ["a", "c", "b"]]


def test_hand_computed_k0_and_three_rankings():
    # k=0: b = 1/2 + 1 = 3/2, a = 1 + 1/3 = 4/3, c = 1/3 + 1 = 4/3 (tie with a, both rank 1 somewhere:
    # a's rank 1 is in the first ranking), d = 1/2, x = 1/2, y = 1/3, z = 1/4.
    fused = rrf([["a", "b", "c"], ["b", "d", "a"], ["c", "x", "y", "z"]], k=0)
    assert [p for p, _ in fused] == ["b", "a", "c", "d", "x", "y", "z"]
    assert [s for _, s in fused] == [1.5, 4 / 3, 4 / 3, 0.5, 0.5, 1 / 3, 0.25]


def test_ties_by_best_rank_then_ranking_order():
    # Mirror images tie; both reach rank 1, and the page ranked first by the earlier ranking wins.
    assert [p for p, _ in rrf([["a", "b"], ["b", "a"]])] == ["a", "b"]
    assert [p for p, _ in rrf([["b", "a"], ["a", "b"]])] == ["b", "a"]
    # k=1: p = 1/2, r = 1/2, s = 1/3 + 1/3 = 2/3, m = 1/4 + 1/4 + 1/2 = 1; p and r tie at rank 1.
    fused = rrf([["p", "s", "m"], ["r", "s", "m"], ["m"]], k=1)
    assert [p for p, _ in fused] == ["m", "s", "p", "r"]
    assert fused[2][1] == fused[3][1] == 0.5
    # k=0: f = 1, g = 1, e = 1/2 + 1/2 = 1, a three-way tie: rank-1 pages first (f's ranking
    # before g's), then e, whose best rank is 2.
    assert rrf([["f", "e"], ["g", "e"]], k=0) == [("f", 1.0), ("g", 1.0), ("e", 1.0)]


def filler(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_exact_ties_do_not_depend_on_addition_order():
    # k=0, u has ranks 1, 3, 7 and v ranks 7, 3, 1 (in ranking order). Exactly equal scores, but
    # in floating point (1 + 1/3) + 1/7 < (1/7 + 1/3) + 1, so summing floats would put v first.
    assert (1 + 1 / 3) + 1 / 7 < (1 / 7 + 1 / 3) + 1
    rankings = [
        ["u", *filler("a", 5), "v"],
        [*filler("b", 2), "u"],
        [*filler("c", 6), "u"],
        [*filler("d", 2), "v"],
        ["v"],
    ]
    fused = rrf(rankings, k=0)
    assert [p for p, _ in fused[:2]] == ["u", "v"]  # exact tie, both best rank 1, u's ranking first
    assert fused[0][1] == fused[1][1]


def test_empty_and_top_k():
    assert rrf([]) == []
    assert rrf([[], []]) == []
    assert rrf([["a", "b"]], top_k=0) == []
    assert [p for p, _ in rrf([["a", "b", "c"]], top_k=2)] == ["a", "b"]


def test_validation():
    with pytest.raises(ValueError, match="more than once"):
        rrf([["a", "b", "a"]])
    with pytest.raises(ValueError, match="k must"):
        rrf([["a"]], k=-1)
    with pytest.raises(ValueError, match="top_k"):
        rrf([["a"]], top_k=-2)
    with pytest.raises(TypeError):
        rrf(["abc"])


pages = st.sampled_from([f"p{i}" for i in range(12)])
rankings_st = st.lists(st.lists(pages, unique=True, max_size=12), max_size=4)


@settings(max_examples=200, deadline=None)
@given(rankings_st, st.integers(0, 100))
def test_properties(rankings, k):
    fused = rrf(rankings, k=k)
    ids = [p for p, _ in fused]
    # Every ranked page once; the score is the formula; best first.
    assert sorted(ids) == sorted({p for r in rankings for p in r})
    for p, s in fused:
        assert s == pytest.approx(sum(1 / (k + r.index(p) + 1) for r in rankings if p in r), rel=1e-12)
    assert all(a[1] >= b[1] for a, b in zip(fused, fused[1:]))
    # top_k is a prefix; a single ranking is returned in its own order.
    assert rrf(rankings, k=k, top_k=3) == fused[:3]
    if len(rankings) == 1:
        assert ids == rankings[0]
    # Deterministic: the same input gives the same output (no dict or set order leaks).
    assert rrf([list(r) for r in rankings], k=k) == fused


@settings(max_examples=100, deadline=None)
@given(rankings_st, st.integers(0, 100))
def test_scores_do_not_depend_on_ranking_order(rankings, k):
    assert dict(rrf(rankings, k=k)) == dict(rrf(rankings[::-1], k=k))


@settings(max_examples=100, deadline=None)
@given(rankings_st, st.integers(0, 100), st.data())
def test_promoting_a_page_never_lowers_it(rankings, k, data):
    """Moving a page up one place in one ranking raises its score and can only improve its position."""
    candidates = [(ri, i) for ri, r in enumerate(rankings) for i in range(1, len(r))]
    if not candidates:
        return
    ri, i = data.draw(st.sampled_from(candidates))
    page = rankings[ri][i]
    promoted = [list(r) for r in rankings]
    promoted[ri][i - 1], promoted[ri][i] = promoted[ri][i], promoted[ri][i - 1]
    before, after = rrf(rankings, k=k), rrf(promoted, k=k)
    assert dict(after)[page] > dict(before)[page]
    assert [p for p, _ in after].index(page) <= [p for p, _ in before].index(page)
