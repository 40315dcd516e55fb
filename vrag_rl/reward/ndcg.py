"""Retrieval quality of a ranked list of page ids against gold pages: NDCG (the retrieval reward), recall, MRR."""

import math
from collections.abc import Collection, Sequence


def retrieval_ndcg(retrieved: Sequence[str], gold: Collection[str], k: int | None = None) -> float:
    """NDCG with binary relevance over the unique retrieved page ids, in retrieval order.

    A page retrieved twice counts once, at its first position: re-retrieving a page brings no new
    evidence and must not earn reward. DCG = sum over ranks i (1-based) of rel_i / log2(i + 1).
    IDCG places every gold page first (only the first ``k`` ranks when ``k`` is given), so gold pages
    the agent never found lower the score. Empty gold gives 0.0: there is nothing to reward.

    With ``k=None`` this equals trec_eval's ``ndcg`` and ranx's ``ndcg``; with ``k`` it equals their
    ``ndcg_cut_k`` / ``ndcg@k``. Note ``k=len(retrieved)`` is *not* the uncut value when there are
    more gold pages than ``k``, because the ideal ranking is then cut at ``k`` too.
    """
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 or None, got {k}")
    gold_set = set(gold)
    if not gold_set:
        return 0.0
    unique = list(dict.fromkeys(retrieved))  # keeps first occurrences, in order
    depth = len(unique) if k is None else min(k, len(unique))
    dcg = sum(1.0 / math.log2(rank + 1) for rank, page in enumerate(unique[:depth], start=1) if page in gold_set)
    ideal_depth = len(gold_set) if k is None else min(k, len(gold_set))
    idcg = sum(1.0 / math.log2(rank + 1) for rank in range(1, ideal_depth + 1))
    return dcg / idcg


def retrieval_recall(retrieved: Sequence[str], gold: Collection[str], k: int | None = None) -> float:
    """Share of the gold pages among the first ``k`` unique retrieved pages (ranx's ``recall@k``)."""
    gold_set = set(gold)
    if not gold_set:
        return 0.0
    unique = list(dict.fromkeys(retrieved))[:k]
    return sum(page in gold_set for page in unique) / len(gold_set)


def reciprocal_rank(retrieved: Sequence[str], gold: Collection[str], k: int | None = None) -> float:
    """1 / rank of the first gold page among the first ``k`` unique retrieved pages, else 0 (ranx's ``mrr@k``)."""
    gold_set = set(gold)
    for rank, page in enumerate(list(dict.fromkeys(retrieved))[:k], start=1):
        if page in gold_set:
            return 1.0 / rank
    return 0.0
