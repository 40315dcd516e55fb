"""Types shared by every retrieval backend."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hit:
    page_id: str  # "{doc}_{page}", pages 1-based
    score: float
    image_path: str  # absolute path of the page image


def rank(
    scores: dict[str, float] | list[tuple[str, float]], order: dict[str, int], top_k: int
) -> list[tuple[str, float]]:
    """Top-k (page_id, score) by score, ties broken by corpus order so results never depend on hash order.

    ``order`` maps page id to its position in the corpus manifest.
    """
    items = scores.items() if isinstance(scores, dict) else scores
    return sorted(items, key=lambda kv: (-kv[1], order[kv[0]]))[:top_k]
