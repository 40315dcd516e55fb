"""Types shared by every retrieval backend: search modes, hits, the index's build config and a loaded shard."""

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


class ApproxKind(Choice):
    """The FAISS index a shard keeps for approximate search."""

    IVF = "ivf"
    HNSW = "hnsw"
    NONE = "none"


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
    approx: str = ApproxKind.IVF  # FAISS index per shard for approximate mode: "ivf", "hnsw" or "none"
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
        object.__setattr__(self, "approx", ApproxKind.parse(self.approx, "approx"))
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
