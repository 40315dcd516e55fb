import math
import random
import warnings

import pytest
import pytrec_eval

from vrag_rl.reward.ndcg import reciprocal_rank, retrieval_ndcg, retrieval_recall

CUTS = (1, 2, 3, 5, 8)


def _random_cases(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Rankings with duplicates and gold sets partly outside the retrievable pool."""
    rng = random.Random(seed)
    pool = [f"doc{d}_{p}" for d in range(3) for p in range(1, 6)]
    cases = []
    for _ in range(n):
        retrieved = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        gold = rng.sample(pool + ["unseen_1", "unseen_2"], rng.randint(1, 6))
        cases.append((retrieved, gold))
    return cases


def _as_trec(cases):
    """qrels/run dicts; scores descend with retrieval order and only a page's first occurrence is scored."""
    qrels, run = {}, {}
    for i, (retrieved, gold) in enumerate(cases):
        qid = f"q{i:04d}"
        qrels[qid] = {page: 1 for page in gold}
        scores: dict[str, float] = {}
        for pos, page in enumerate(retrieved):
            scores.setdefault(page, float(len(retrieved) - pos))
        run[qid] = scores
    return qrels, run


def test_hand_computed_values():
    assert retrieval_ndcg(["a", "b"], {"a", "b"}) == pytest.approx(1.0)
    assert retrieval_ndcg(["x", "a"], {"a"}) == pytest.approx(1 / math.log2(3))
    # a duplicate keeps its first rank and takes no rank of its own
    assert retrieval_ndcg(["a", "a", "b"], {"a", "b"}) == pytest.approx(1.0)
    assert retrieval_ndcg(["x", "x", "a"], {"a"}) == pytest.approx(1 / math.log2(3))
    # a gold page never retrieved lowers the score through IDCG
    assert retrieval_ndcg(["a"], {"a", "b"}) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    # at k=1 the ideal ranking is cut at one page too
    assert retrieval_ndcg(["a"], {"a", "b"}, k=1) == pytest.approx(1.0)
    assert retrieval_ndcg(["x", "a"], {"a", "b"}, k=1) == 0.0


def test_edge_cases():
    assert retrieval_ndcg([], {"a"}) == 0.0
    assert retrieval_ndcg(["a"], set()) == 0.0
    assert retrieval_ndcg(["a"], []) == 0.0
    assert retrieval_ndcg(["a", "b"], {"a"}, k=100) == pytest.approx(1.0)
    for bad_k in (0, -1):
        with pytest.raises(ValueError):
            retrieval_ndcg(["a"], {"a"}, k=bad_k)


def test_matches_pytrec_eval():
    cases = _random_cases(400, seed=1)
    qrels, run = _as_trec(cases)
    measures = {"ndcg"} | {f"ndcg_cut.{k}" for k in CUTS}
    results = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    for i, (retrieved, gold) in enumerate(cases):
        expected = results[f"q{i:04d}"]
        assert retrieval_ndcg(retrieved, gold) == pytest.approx(expected["ndcg"], abs=1e-12)
        for k in CUTS:
            assert retrieval_ndcg(retrieved, gold, k=k) == pytest.approx(expected[f"ndcg_cut_{k}"], abs=1e-12)


def test_ndcg_recall_and_mrr_match_ranx():
    """ranx's numba kernels directly (its Qrels/Run wrappers add seconds of start-up): rows are
    [page number, score] with the run already in descending-score order, as ranx's Run sorts it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba type-safety chatter from inside ranx
        import numpy as np
        from numba.typed import List
        from ranx import metrics

        cases = _random_cases(300, seed=2)
        qrels, run = _as_trec(cases)
        page_number: dict[str, float] = {}
        for pages in list(qrels.values()) + list(run.values()):
            for page in pages:
                page_number.setdefault(page, float(len(page_number) + 1))

        def rows(scored: dict[str, float]) -> np.ndarray:
            ranked = sorted(scored.items(), key=lambda item: -item[1])
            return np.array([[page_number[page], score] for page, score in ranked], dtype=np.float64)

        qrels_rows = List([rows(qrels[qid]) for qid in sorted(qrels)])
        run_rows = List([rows(run[qid]) for qid in sorted(qrels)])
        oracles = {"ndcg": metrics.ndcg, "recall": metrics.recall, "mrr": metrics.reciprocal_rank}
        # k=0: no cut-off
        expected = {(m, k): f(qrels_rows, run_rows, k) for m, f in oracles.items() for k in (0, *CUTS)}
    ours = {"ndcg": retrieval_ndcg, "recall": retrieval_recall, "mrr": reciprocal_rank}
    for i, (retrieved, gold) in enumerate(cases):
        for name, fn in ours.items():
            assert fn(retrieved, gold) == pytest.approx(expected[name, 0][i], abs=1e-12), name
            for k in CUTS:
                assert fn(retrieved, gold, k=k) == pytest.approx(expected[name, k][i], abs=1e-12), (name, k)


def test_uncut_equals_cut_at_list_length_only_when_gold_fits():
    """k = number of unique retrieved pages cuts the ideal ranking as well, so the two agree exactly
    when all gold pages fit in that many ranks; otherwise the cut value is larger (or both are 0)."""
    fits = overflows = 0
    for retrieved, gold in _random_cases(400, seed=3):
        depth = len(set(retrieved))
        uncut, cut = retrieval_ndcg(retrieved, gold), retrieval_ndcg(retrieved, gold, k=depth)
        if len(set(gold)) <= depth:
            fits += 1
            assert cut == pytest.approx(uncut, abs=1e-12)
        else:
            overflows += 1
            assert cut > uncut or cut == uncut == 0.0
    assert fits > 50 and overflows > 50
