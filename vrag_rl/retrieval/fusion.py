"""Reciprocal rank fusion (Cormack, Clarke & Buettcher, SIGIR 2009) of several rankings of page ids.

score(d) = sum over rankings r that contain d of 1 / (k + rank_r(d)), ranks 1-based. Only ranks
are used, never the rankers' scores, so a visual MaxSim ranking and a BM25 ranking fuse without any
score calibration. A page missing from a ranking gets nothing from it. Sums are exact (fractions),
so equal scores tie exactly whatever the order of addition, and the tie rule below decides.
"""

from __future__ import annotations

from fractions import Fraction


def reciprocal_rank_fusion(
    rankings: list[list[str]], k: float = 60, top_k: int | None = None
) -> list[tuple[str, float]]:
    """Fused (page_id, score), best first, at most ``top_k`` (all when None).

    Ties are broken deterministically: first by the best (smallest) rank the page reached in any
    ranking, then by the position in ``rankings`` of the first ranking giving it that rank. So with
    rankings [visual, text], a page the visual ranker put first beats one the text ranker put
    first at equal score.
    """
    if isinstance(rankings, (str, bytes)) or any(isinstance(r, (str, bytes)) for r in rankings):
        raise TypeError("rankings must be a list of lists of page ids")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 or None, got {top_k}")
    kf = Fraction(k)
    score: dict[str, Fraction] = {}
    first: dict[str, tuple[int, int]] = {}  # page -> (best rank, index of the ranking giving it)
    for ri, ranking in enumerate(rankings):
        if len(set(ranking)) != len(ranking):
            dup = sorted({p for p in ranking if ranking.count(p) > 1})
            raise ValueError(f"ranking {ri} lists page(s) {dup[:5]} more than once")
        for rank, page in enumerate(ranking, start=1):
            score[page] = score.get(page, Fraction(0)) + 1 / (kf + rank)
            first[page] = min(first.get(page, (rank, ri)), (rank, ri))
    fused = sorted(score.items(), key=lambda kv: (-kv[1], first[kv[0]]))
    if top_k is not None:
        fused = fused[:top_k]
    return [(page, float(s)) for page, s in fused]
