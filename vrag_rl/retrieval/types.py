"""Types shared by every retrieval backend: search modes and settings, hits, the index's build config and a
loaded shard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from vrag_rl.choice import Choice

if TYPE_CHECKING:
    from vrag_rl.retrieval.maxsim import Chunk


class SearchMode(Choice):
    """What a text query is matched against."""

    VISUAL = "visual"  # ColQwen2 MaxSim over page images
    TEXT = "text"  # BM25 over the pages' OCR text
    DENSE = "dense"  # one CLIP / SigLIP vector per page image (retrieval.dense_index)
    HYBRID = "hybrid"  # reciprocal rank fusion of the rankings of every index the retriever has


class IndexMode(Choice):
    """How the visual index scores pages."""

    EXACT = "exact"  # MaxSim over every page
    APPROX = "approx"  # FAISS candidates, then exact MaxSim over them


class FaissKind(Choice):
    """The FAISS index kept beside an index's vectors: a multi-vector shard's (for approximate search, or
    none) or the single-vector index's (its one search structure, flat when exact)."""

    EXACT = "exact"  # a flat inner-product index: every vector scored (single-vector index only)
    IVF = "ivf"
    HNSW = "hnsw"
    NONE = "none"  # no FAISS index: exact MaxSim only (multi-vector index only)

    @classmethod
    def parse_among(cls, value: str, key: str, allowed: tuple[FaissKind, ...]) -> FaissKind:
        """``Choice.parse`` limited to the kinds one index supports."""
        if value not in allowed:
            raise ValueError(f"{key} must be one of {[str(k) for k in allowed]}, got {value!r}")
        return cls(value)


MULTI_VECTOR_KINDS = (FaissKind.IVF, FaissKind.HNSW, FaissKind.NONE)  # per shard, for approximate search
SINGLE_VECTOR_KINDS = (FaissKind.EXACT, FaissKind.IVF, FaissKind.HNSW)


@dataclass(frozen=True)
class SearchSettings:
    """How a retriever searches, fixed when it is made: the same for every query it answers."""

    index_mode: IndexMode = IndexMode.EXACT
    """How the ColQwen2 index scores pages: ``exact`` MaxSim over every page, or ``approx`` (FAISS candidates,
    then exact MaxSim over them: needs an index built with FAISS). A string is taken as its member."""
    fusion_depth: int = 50
    """Hybrid mode: how deep each index's ranking goes before fusion (at least the query's top_k); deeper
    rankings give a steadier fusion."""
    rrf_k: int = 60
    """Hybrid mode: reciprocal rank fusion's k, added to every rank; larger k flattens the weight of the first
    places."""

    def __post_init__(self):
        object.__setattr__(self, "index_mode", IndexMode.parse(self.index_mode, "index_mode"))
        if self.fusion_depth < 1 or self.rrf_k < 0:
            raise ValueError(f"fusion_depth must be >= 1 and rrf_k >= 0, got {self.fusion_depth}, {self.rrf_k}")


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


@dataclass(frozen=True)
class IndexConfig:
    shard_size: int = 4096  # pages per shard
    dtype: str = "float16"  # storage of token vectors: float16 or float32 (scoring: compute_dtype)
    approx: str = FaissKind.IVF  # FAISS index per shard for approximate mode: "ivf", "hnsw" or "none"
    nlist: int = 0  # IVF lists per shard; 0 = about sqrt(n_tokens), a power of two
    ivf_codec: str = "Flat"  # FAISS codec of IVF lists: Flat (exact float32), SQ8 (4x smaller), PQ16, ...
    hnsw_m: int = 32
    ef_construction: int = 80
    nprobe: int = 16  # search-time settings below; search() can override them per call
    ef_search: int = 64
    k_tokens: int = 512  # FAISS neighbours per query token: a page has many near-identical tokens, so
    # a small k is used up by the best page alone (k=64 found 22% of the exact top 10 at 700 tokens per page)
    n_rerank: int = 128  # candidate pages per query and shard scored exactly
    rescore: int = 32  # after a bf16 scan (compute_dtype): its best pages per query and shard re-scored in float32
    chunk_tokens: int = 8192  # token rows per matrix product: its similarity block stays in cache
    compute_dtype: str = "float32"  # exact mode's scan: float32, or bfloat16 (AMX / avx512_bf16 CPUs, GPUs)

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        object.__setattr__(self, "approx", FaissKind.parse_among(self.approx, "approx", MULTI_VECTOR_KINDS))
        if min(self.nprobe, self.ef_search, self.k_tokens, self.n_rerank, self.rescore, self.chunk_tokens) < 1:
            raise ValueError("nprobe, ef_search, k_tokens, n_rerank, rescore and chunk_tokens must be >= 1")


@dataclass
class Shard:
    """One shard of the index in memory: its pages' token vectors and, for approximate search, FAISS."""

    id: int
    vectors: Tensor  # (n_tokens, dim), storage dtype
    positions: np.ndarray  # global page position of each stored page
    offsets: np.ndarray  # (n_pages + 1,) token offsets
    chunks: list[Chunk]
    faiss_index: object | None

    @property
    def n_pages(self) -> int:
        return len(self.positions)
