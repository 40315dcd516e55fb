"""Synthetic multi-vector corpora with the structure that makes approximate search meaningful.

Not uniform noise (where every page is equally far from every query and "nearest" means nothing): every
token is a unit vector mixing a topic centroid (visual words shared across the corpus), its collection's,
its document's and its page's own direction, and token noise. Topics nest: a collection (say, one
company's reports) has a pool of topics, each document draws its pool from the collection's, each page
from its document's, so pages of one document look alike and documents of one collection are related.
A query's exact top 10 is then its target page, the target's document and related documents, rather
than a flat tail of pages that match by chance. A query picks a
target page and perturbs some of its tokens, like a question about what the page shows. Page i's vectors
depend only on (seed, i), so pages can be generated in any order, in chunks, for corpora larger than memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class SyntheticSpec:
    n_pages: int
    tokens: int = 64  # tokens per page (varied by +-tokens_jitter)
    tokens_jitter: int = 0
    dim: int = 128
    n_topics: int = 1024
    topics_per_collection: int = 24
    topics_per_doc: int = 12
    topics_per_page: int = 8
    pages_per_doc: int = 5
    docs_per_collection: int = 4
    topic_weight: float = 1.0
    collection_weight: float = 0.4
    doc_weight: float = 0.6
    page_weight: float = 0.5
    noise: float = 0.5  # norm of the per-token noise
    seed: int = 0


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class SyntheticCorpus:
    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        self.topics = _unit(rng.standard_normal((spec.n_topics, spec.dim))).astype(np.float32)

    def page_id(self, i: int) -> str:
        return f"doc{i // self.spec.pages_per_doc:06d}_{i % self.spec.pages_per_doc + 1}"

    def _direction(self, kind: int, i: int) -> np.ndarray:
        return _unit(np.random.default_rng([self.spec.seed, kind, i]).standard_normal(self.spec.dim))

    def page(self, i: int) -> Tensor:
        """(n_tokens, dim) float32 unit rows of page i."""
        s = self.spec
        rng = np.random.default_rng([s.seed, 3, i])
        n = s.tokens + (int(rng.integers(-s.tokens_jitter, s.tokens_jitter + 1)) if s.tokens_jitter else 0)
        doc = i // s.pages_per_doc
        collection = doc // s.docs_per_collection
        pool = np.random.default_rng([s.seed, 6, collection]).choice(s.n_topics, s.topics_per_collection, replace=False)
        pool = np.random.default_rng([s.seed, 5, doc]).choice(pool, s.topics_per_doc, replace=False)
        topics = rng.choice(pool, size=s.topics_per_page, replace=False)
        x = s.topic_weight * self.topics[rng.choice(topics, size=n)]
        x += s.collection_weight * self._direction(7, collection)
        x += s.doc_weight * self._direction(1, doc) + s.page_weight * self._direction(2, i)
        x += rng.standard_normal((n, s.dim), dtype=np.float32) * (s.noise / np.sqrt(s.dim))
        return torch.from_numpy(_unit(x).astype(np.float32))

    def pages(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, str, Tensor]]:
        """(page_id, checksum, vectors) as MultiVectorIndex.create takes them; checksum is empty (no image)."""
        for i in range(start, self.spec.n_pages if stop is None else stop):
            yield self.page_id(i), "", self.page(i)

    def queries(self, n: int, tokens: int = 20, noise: float = 0.5, seed: int = 1) -> tuple[list[Tensor], list[int]]:
        """n queries of ``tokens`` vectors, each near random tokens of one target page; returns (queries, targets)."""
        rng = np.random.default_rng([self.spec.seed, 4, seed])
        targets = rng.choice(self.spec.n_pages, size=n, replace=False).tolist()
        out = []
        for t in targets:
            page = self.page(t).numpy()
            picked = page[rng.choice(len(page), size=tokens, replace=tokens > len(page))]
            q = picked + rng.standard_normal(picked.shape).astype(np.float32) * (noise / np.sqrt(self.spec.dim))
            out.append(torch.from_numpy(_unit(q).astype(np.float32)))
        return out, targets
