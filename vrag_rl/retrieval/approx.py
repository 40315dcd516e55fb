"""Approximate MaxSim: FAISS nearest token vectors propose candidate pages, exact MaxSim ranks them.

Per shard, a FAISS inner-product index holds every token vector (row i = token row i of the shard): IVF with a
configurable codec (``ivf_codec``: "Flat" keeps float32 vectors, 512 B each at d=128; "SQ8" one byte per
dimension, 4x less; "PQ16" 16 bytes, 32x less, but its codebook training is slow) or HNSW. Each query token
fetches its ``k_tokens`` nearest token vectors; a page's approximate score is the sum over query tokens of its
best fetched similarity (ColBERT's candidate stage, missing tokens count 0). The ``n_rerank`` best candidates
per query are then scored exactly, so returned scores are exact MaxSim scores; only a page never proposed can
be missed.
With the token vectors on CUDA, IVF candidates come from FAISS's GPU build (``faiss-gpu``, the gpu install set).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vrag_rl.data.records import sha256_file, temp_path
from vrag_rl.retrieval.maxsim import gather_pages, maxsim, plan_chunks, top_k_ties
from vrag_rl.retrieval.types import FaissKind, IndexConfig, Shard

_ADD_ROWS = 1 << 18  # vectors widened to float32 and added to FAISS at a time


def import_faiss():
    """Import faiss with its OpenMP threads sleeping, not spinning, between parallel regions.

    faiss-cpu wheels bundle their own libgomp next to torch's. By default idle OpenMP threads spin, so
    the torch matrix products that follow a FAISS search (the rerank) ran ~5x slower on 2 cores while
    FAISS's threads burned the CPUs. libgomp reads OMP_WAIT_POLICY once, when it is loaded; the variable
    is restored right after, so torch and child processes keep their own setting.
    """
    if "faiss" not in sys.modules:
        previous = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            import faiss  # noqa: F401
        finally:
            if previous is None:
                del os.environ["OMP_WAIT_POLICY"]
            else:
                os.environ["OMP_WAIT_POLICY"] = previous
    return sys.modules["faiss"]


def auto_nlist(n_tokens: int) -> int:
    """A power of two near sqrt(n): the usual IVF balance, capped so training stays quick and lists non-empty."""
    nlist = 2 ** round(np.log2(max(np.sqrt(n_tokens), 1)))
    return int(max(1, min(nlist, 4096, n_tokens // 39)))  # FAISS wants >= 39 training points per list


def build_and_save(vectors: np.ndarray, cfg: IndexConfig, path: Path, progress: bool = False) -> str:
    """Build the shard's FAISS index, write it to ``path`` and return the file's sha256."""
    from vrag_rl.progress import progress_bar

    faiss = import_faiss()
    n, d = vectors.shape
    if cfg.approx == FaissKind.HNSW:
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
    else:
        nlist = min(cfg.nlist or auto_nlist(n), n)
        try:
            index = faiss.index_factory(d, f"IVF{nlist},{cfg.ivf_codec}", faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(
                f"ivf_codec {cfg.ivf_codec!r} is not a FAISS IVF codec (Flat, SQ8, SQfp16, PQ16, ...)"
            ) from err
        # A seeded sample of 64 points per list trains the coarse centroids (and the codec).
        rows = np.sort(np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False))
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    for start in progress_bar(range(0, n, _ADD_ROWS), desc="faiss add", unit="chunk", disable=not progress):
        index.add(np.ascontiguousarray(vectors[start : start + _ADD_ROWS], dtype=np.float32))
    tmp = temp_path(path)
    faiss.write_index(index, str(tmp))
    tmp.replace(path)
    return sha256_file(path)


_GPU_RESOURCES: dict[int, object] = {}  # one FAISS GPU resource (streams, scratch memory) per device and process


def load(path: Path, device: str = "cpu"):
    """Read a shard's FAISS index; on a CUDA device an IVF index moves to FAISS's GPU build when it has one."""
    faiss = import_faiss()
    index = faiss.read_index(str(path))
    if not device.startswith("cuda") or isinstance(index, faiss.IndexHNSW):
        return index  # FAISS has no GPU HNSW: it searches on the CPU beside GPU vectors
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        warnings.warn(
            "token vectors are on CUDA but this FAISS has no GPU support: IVF candidates use the CPU", stacklevel=2
        )
        return index
    gpu = torch.device(device).index or 0
    resources = _GPU_RESOURCES.setdefault(gpu, faiss.StandardGpuResources())
    return faiss.index_cpu_to_gpu(resources, gpu, index)


def _params(index, cfg: IndexConfig):
    faiss = import_faiss()
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=cfg.ef_search)
    return faiss.SearchParametersIVF(nprobe=cfg.nprobe)


def search(shard: Shard, queries: Tensor, cfg: IndexConfig, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query of the zero-padded batch (B, Lq, d): storage indices and exact scores of its top k pages."""
    b, lq, d = queries.shape
    flat = queries.reshape(b * lq, d)
    real = (flat != 0).any(dim=1).cpu().numpy()  # padding rows are exactly zero, real ones unit vectors
    rows = np.ascontiguousarray(flat.cpu().numpy()[real], dtype=np.float32)
    qid = np.repeat(np.arange(b), lq)[real]
    sims, ids = shard.faiss_index.search(rows, cfg.k_tokens, params=_params(shard.faiss_index, cfg))
    token = np.repeat(np.arange(len(rows)), cfg.k_tokens)
    keep = ids.ravel() >= 0  # FAISS pads with -1 when it finds fewer than k
    token, ids, sims = token[keep], ids.ravel()[keep], sims.ravel()[keep]
    n_pages = shard.n_pages
    page = np.searchsorted(shard.offsets, ids, side="right") - 1
    # Best similarity per (query token, page), then summed per (query, page).
    key = token * n_pages + page
    order = np.lexsort((-sims, key))
    key, sims = key[order], sims[order]
    first = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, bool)
    key, sims = key[first], sims[first]
    qkey = qid[key // n_pages] * n_pages + key % n_pages
    uniq, inverse = np.unique(qkey, return_inverse=True)
    approx_scores = np.bincount(inverse, weights=sims, minlength=len(uniq))
    bounds = np.searchsorted(uniq // n_pages, np.arange(b + 1))
    out = []
    for j in range(b):
        cand = uniq[bounds[j] : bounds[j + 1]] % n_pages
        scores = approx_scores[bounds[j] : bounds[j + 1]]
        best = np.lexsort((shard.positions[cand], -scores))[: max(cfg.n_rerank, k)]
        out.append(rerank(shard, cand[best], queries[j : j + 1], k, cfg.chunk_tokens))
    return out


def rerank(shard: Shard, cand: np.ndarray, query: Tensor, k: int, chunk_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 MaxSim of one query (1, Lq, d) over candidate pages (storage indices): the top k, as storage
    indices and scores."""
    if len(cand) == 0:
        return cand, np.zeros(0, np.float32)
    cand = np.sort(cand)  # storage order: equal-length pages stay side by side
    vectors, lengths = gather_pages(shard.vectors, shard.offsets, cand)
    exact = maxsim(vectors, plan_chunks(lengths, chunk_tokens), len(cand), query)[:, 0]
    idx, vals = top_k_ties(exact, shard.positions[cand], k)
    return cand[idx], vals
