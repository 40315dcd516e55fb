"""Exact late-interaction (MaxSim) scoring over pages stored as one concatenated token matrix.

score(q, p) = sum over query tokens of the max dot product with the page's tokens — colpali-engine's
definition, without its padding artefact: its batched scorer zero-pads pages, so a query token whose
similarities with a shorter page are all negative scores 0 there instead of their maximum.

Speed: pages of a shard are concatenated (N_tokens x d) and scored by one large matrix product per chunk
of tokens against every query token of a batch at once (queries zero-padded into one tensor: a zero
query token adds exactly 0, as in colpali-engine). The per-page max is a reshape + ``amax`` over runs of
equal-length pages (shards store their pages sorted by length, so runs are long); no Python loop over
pages, no scatter. Float16 storage is widened chunk by chunk into a reused float32 buffer, because
CPU half-precision GEMM is a slow path while the widening copy is cheap.

``compute`` bfloat16 runs the products in bf16 (each chunk copied into a bf16 buffer, float16 storage by way of
a float32 one; the similarities kept in bf16, their per-page maxima summed in float32): several times fp32's
speed where the CPU has AMX or avx512_bf16 (and on GPUs), a slow path elsewhere; ``bench/retrieval.py``
measures both side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# (offset of the piece's first token inside its chunk, first page, number of pages, tokens per page)
Piece = tuple[int, int, int, int]


@dataclass(frozen=True)
class Chunk:
    start: int  # first token row
    stop: int
    pieces: tuple[Piece, ...]


def plan_chunks(lengths: np.ndarray, chunk_tokens: int) -> list[Chunk]:
    """Split pages (token counts in storage order) into chunks of at most ``chunk_tokens`` rows.

    A chunk ends on a page boundary; a page longer than ``chunk_tokens`` gets a chunk of its own.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.min() < 1:
        raise ValueError("every page needs at least one token vector")
    # Runs of consecutive equal lengths: (first page, number of pages, length).
    starts = np.flatnonzero(np.r_[True, lengths[1:] != lengths[:-1]]) if len(lengths) else np.array([], np.int64)
    counts = np.diff(np.r_[starts, len(lengths)])
    chunks: list[Chunk] = []
    pieces: list[Piece] = []
    chunk_start = used = 0
    for page, n, length in zip(starts.tolist(), counts.tolist(), lengths[starts].tolist()):
        while n:
            room = max(chunk_tokens - used, 0) // length
            if room == 0 and pieces:
                chunks.append(Chunk(chunk_start, chunk_start + used, tuple(pieces)))
                chunk_start, used, pieces = chunk_start + used, 0, []
                continue
            take = min(n, max(room, 1))
            pieces.append((used, page, take, length))
            used += take * length
            page += take
            n -= take
    if pieces:
        chunks.append(Chunk(chunk_start, chunk_start + used, tuple(pieces)))
    return chunks


def pad_queries(queries: list[Tensor], dim: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, Lq_max, dim) float32, zero-padded; checks shapes and finiteness with a clear message."""
    if not queries:
        raise ValueError("no query embeddings given")
    for i, q in enumerate(queries):
        if not isinstance(q, Tensor) or q.ndim != 2 or q.shape[1] != dim or q.shape[0] < 1:
            shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ValueError(f"query {i}: expected a (n_tokens >= 1, {dim}) tensor, got {shape}")
        if not torch.isfinite(q).all():
            raise ValueError(f"query {i}: embedding has NaN/inf values (padding rows not dropped?)")
    return torch.nn.utils.rnn.pad_sequence([q.float() for q in queries], batch_first=True).to(device)


def maxsim(
    vectors: Tensor, chunks: list[Chunk], n_pages: int, queries: Tensor, compute: torch.dtype = torch.float32
) -> Tensor:
    """Scores (n_pages, B) of every page against zero-padded ``queries`` (B, Lq, d), float32; the matrix
    products in ``compute`` (float32 or bfloat16)."""
    b, lq, d = queries.shape
    qt = queries.reshape(b * lq, d).T.to(compute).contiguous()
    out = torch.empty(n_pages, b, dtype=torch.float32, device=vectors.device)
    convert = vectors.dtype != compute
    biggest = max((c.stop - c.start for c in chunks), default=0)
    buf = torch.empty(biggest, d, dtype=compute, device=vectors.device) if convert else None
    # float16 -> bfloat16 in one copy is a scalar path on CPU; through a float32 buffer it is ~5x faster
    via = vectors.dtype == torch.float16 and compute == torch.bfloat16
    wide = torch.empty(biggest, d, dtype=torch.float32, device=vectors.device) if via else None
    sims_buf = torch.empty(biggest * b * lq, dtype=compute, device=vectors.device)
    for c in chunks:
        n_rows = c.stop - c.start
        x = vectors[c.start : c.stop]
        if via:
            x = wide[:n_rows].copy_(x)
        if convert:
            x = buf[:n_rows].copy_(x)
        sims = torch.mm(x, qt, out=sims_buf[: n_rows * b * lq].view(n_rows, b * lq))
        for offset, page, n, length in c.pieces:
            block = sims[offset : offset + n * length].view(n, length, b, lq)
            out[page : page + n] = block.amax(dim=1).sum(dim=-1, dtype=torch.float32)
    return out


def gather_pages(vectors: Tensor, offsets: np.ndarray, pages: np.ndarray) -> tuple[Tensor, np.ndarray]:
    """Token rows of ``pages`` (storage indices, ascending) concatenated, and their lengths."""
    starts = offsets[pages]
    lengths = offsets[pages + 1] - starts
    # Row index of every gathered token: its page's start plus its rank inside the page.
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    rows = np.repeat(starts, lengths) + (np.arange(int(lengths.sum())) - first)
    return vectors[torch.from_numpy(rows)], lengths


def top_k_ties(scores: Tensor, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k best, ties broken by ``positions`` (the pages' global index order).

    ``torch.topk`` alone is not deterministic on ties; every page scoring at least the k-th best score
    is ranked by (-score, position) instead.
    """
    k = min(k, scores.numel())
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    kth = torch.topk(scores, k).values[-1]
    cand = torch.nonzero(scores >= kth).squeeze(1).cpu().numpy()
    vals = scores[torch.from_numpy(cand).to(scores.device)].cpu().numpy()
    order = np.lexsort((positions[cand], -vals))[:k]
    return cand[order], vals[order]
