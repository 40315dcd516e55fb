"""Sharded multi-vector page index: exact MaxSim, and FAISS candidate generation + exact MaxSim rerank.

On disk (``INDEX/``)::

    manifest.json                 format version, embedder fingerprint, build config, every page id with its
                                  image checksum (the index order = tie-break order), a checksum of that
                                  list, and per shard its files' sha256
    shard_00000.vectors.npy       (n_tokens, dim) token vectors of the shard's pages, concatenated
    shard_00000.pages.npy         (n_pages, 2) int64: [global page position, n_tokens] in storage order;
                                  page offsets are the running sum of n_tokens
    shard_00000.faiss             FAISS index over the shard's token vectors (approximate mode)

Vectors are stored as float16 by default: half the memory and disk of float32, and ColQwen2's
L2-normalised vectors lose ~1e-3 relative precision (scores move by ~1e-3, rankings of distinct pages
practically never). Scoring runs in float32 (``IndexConfig.dtype="float32"`` stores exact copies). On request
(``compute_dtype=bfloat16``, a search-time setting) exact search scans every page with bf16 products (see
``maxsim.py``) and re-scores its ``rescore`` best per query and shard in float32: the scores returned are
float32 MaxSim, and the top k is float32's unless one of its pages falls outside the scan's ``rescore`` best.
A shard stores its pages sorted by token count, so MaxSim is a reshape + max over long equal-length runs.

Every shard has its own FAISS index, so an actor can load any subset of shards and answer for it alone;
results of shards merge by score then global position. ``add_pages`` writes new shards and replaces the
manifest atomically (the manifest is written last: its presence means the index is complete).

    python -m vrag_rl.retrieval.index build --corpus C --model DIR --out I [--shard-size N] [--pool-factor K]
    python -m vrag_rl.retrieval.index add --index I --corpus C --model DIR   # index the corpus's new pages
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vrag_rl.data.records import load_pages, page_checksum, writer_lock
from vrag_rl.retrieval import approx
from vrag_rl.retrieval.maxsim import maxsim, pad_queries, top_k_ties
from vrag_rl.retrieval.store import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    StaleIndexError,
    check_current,
    load_shard,
    read_manifest,
    write_manifest,
    write_shards,
)
from vrag_rl.retrieval.types import MULTI_VECTOR_KINDS, FaissKind, IndexConfig, IndexMode, Shard

__all__ = ["MultiVectorIndex", "StaleIndexError"]

_MAX_QUERY_COLUMNS = 512  # query tokens scored per matrix product: bounds the (chunk x columns) buffer
_ADD_OR_REBUILD = "Add new pages with add_pages, or rebuild the index"


class MultiVectorIndex:
    """Load with ``MultiVectorIndex.load``; make with ``build`` (a corpus) or ``create`` (given embeddings)."""

    def __init__(self, index_dir: Path, manifest: dict, shards: list[Shard]):
        self.dir = index_dir
        self.manifest = manifest
        self.cfg = IndexConfig(**manifest["config"])
        self.shards = shards
        self.all_page_ids: list[str] = [pid for pid, _ in manifest["pages"]]

    # ---- properties -------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        """Shards in the whole index (loaded or not)."""
        return len(self.manifest["shards"])

    @property
    def loaded_shards(self) -> list[int]:
        return [s.id for s in self.shards]

    @property
    def page_ids(self) -> list[str]:
        """Pages of the loaded shards in index order (corpus order at build, added pages after)."""
        positions = np.sort(np.concatenate([s.positions for s in self.shards])) if self.shards else []
        return [self.all_page_ids[p] for p in positions]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    def page_vectors(self, page_id: str) -> Tensor:
        """The stored token vectors of a loaded page, as float32."""
        pos = self.all_page_ids.index(page_id)
        for s in self.shards:
            hit = np.flatnonzero(s.positions == pos)
            if len(hit):
                i = int(hit[0])
                return s.vectors[s.offsets[i] : s.offsets[i + 1]].float()
        raise KeyError(f"page {page_id!r} is not in the loaded shards")

    # ---- making ------------------------------------------------------------------------------------
    @classmethod
    def build(cls, out_dir, corpus_dir, embedder, cfg: IndexConfig = IndexConfig(), progress: bool = True):
        """Embed every page of the corpus manifest (in its order) and write the index."""
        pages = load_pages(corpus_dir)
        if not pages:
            raise ValueError(f"corpus {corpus_dir} has no pages")
        return cls.create(
            out_dir, embed_pages(pages, embedder), embedder.fingerprint, embedder.dim, cfg, len(pages), progress
        )

    @classmethod
    def create(
        cls,
        out_dir,
        pages: Iterable[tuple[str, str, Tensor]],
        fingerprint: str,
        dim: int,
        cfg: IndexConfig = IndexConfig(),
        total: int | None = None,
        progress: bool = False,
    ):
        """Write an index from (page_id, image checksum, token vectors) in index order."""
        out_dir = Path(out_dir)
        with writer_lock(out_dir, "index"):
            if (out_dir / MANIFEST).exists():
                raise FileExistsError(f"{out_dir} already holds an index; add pages with add_pages or remove it")
            cls._write_new(out_dir, pages, fingerprint, dim, cfg, total, progress)
        return cls.load(out_dir, verify=False)

    @staticmethod
    def _write_new(out_dir: Path, pages, fingerprint: str, dim: int, cfg: IndexConfig, total, progress) -> None:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "dim": dim,
            "config": dataclasses.asdict(cfg),
            "pages": [],
            "corpus_checksum": "",
            "shards": [],
        }
        write_shards(out_dir, manifest, pages, total, progress)
        if not manifest["shards"]:
            raise ValueError("no pages to index")
        write_manifest(out_dir, manifest)

    def add_pages(self, corpus_dir, page_ids: list[str], embedder, progress: bool = True) -> None:
        """Embed corpus pages not yet indexed (taken in corpus order) into new shards."""
        if embedder.fingerprint != self.fingerprint:
            raise StaleIndexError(
                "fingerprint",
                f"embedder fingerprint {embedder.fingerprint[:12]}… differs from the "
                f"index's {self.fingerprint[:12]}…: add pages with the model the index was built with",
            )
        by_id = {p.page_id: p for p in load_pages(corpus_dir)}
        unknown = [pid for pid in page_ids if pid not in by_id]
        if unknown:
            raise KeyError(f"pages not in corpus {corpus_dir}: {unknown[:5]}")
        order = {pid: i for i, pid in enumerate(by_id)}
        records = [by_id[pid] for pid in sorted(page_ids, key=order.__getitem__)]
        self.add_embeddings(embed_pages(records, embedder), len(records), progress)

    def add_embeddings(
        self, pages: Iterable[tuple[str, str, Tensor]], total: int | None = None, progress: bool = False
    ) -> None:
        """Append (page_id, image checksum, token vectors) as new shards; the manifest is replaced atomically."""
        with writer_lock(self.dir, "index"):
            self._append(pages, total, progress)

    def _append(self, pages: Iterable[tuple[str, str, Tensor]], total: int | None, progress: bool) -> None:
        if read_manifest(self.dir) != self.manifest:
            raise StaleIndexError("version", f"{self.dir} changed on disk since it was loaded; load it again")
        manifest = json.loads(json.dumps(self.manifest))
        first_new = len(manifest["shards"])
        write_shards(self.dir, manifest, pages, total, progress)  # rejects pages already indexed
        if len(manifest["shards"]) == first_new:
            return
        write_manifest(self.dir, manifest)
        self.manifest = manifest
        self.all_page_ids = [pid for pid, _ in manifest["pages"]]
        self.shards += [
            load_shard(self.dir, manifest, i, verify=False, device=self._device)
            for i in range(first_new, len(manifest["shards"]))
        ]

    # ---- loading -----------------------------------------------------------------------------------
    @staticmethod
    def count_shards(index_dir) -> int:
        return len(read_manifest(Path(index_dir))["shards"])

    @classmethod
    def load(
        cls,
        index_dir,
        shards: list[int] | None = None,
        expected_fingerprint: str | None = None,
        corpus_dir=None,
        verify: bool = True,
        device: str = "cpu",
    ) -> MultiVectorIndex:
        """Open an index, or only ``shards`` of it, checking the manifest and (``verify``) every file's sha256.

        ``expected_fingerprint``: the query embedder's; ``corpus_dir``: the corpus it must be current for.
        """
        index_dir = Path(index_dir)
        manifest = read_manifest(
            index_dir, expected_fingerprint=expected_fingerprint, corpus_dir=corpus_dir, remedy=_ADD_OR_REBUILD
        )
        n = len(manifest["shards"])
        ids = list(range(n)) if shards is None else list(shards)
        bad = [i for i in ids if not 0 <= i < n]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"shards {ids} invalid: the index has shards 0..{n - 1}")
        return cls(index_dir, manifest, [load_shard(index_dir, manifest, i, verify, device) for i in ids])

    @property
    def _device(self) -> str:
        return str(self.shards[0].vectors.device) if self.shards else "cpu"

    def check_corpus(self, corpus_dir) -> None:
        """Fail (reason "corpus") unless the index holds exactly the corpus's pages with the same images."""
        check_current(self.manifest, self.dir, corpus_dir, "index", _ADD_OR_REBUILD)

    # ---- search ------------------------------------------------------------------------------------
    def search(
        self, query_embeddings: list[Tensor], top_k: int, mode: str = IndexMode.EXACT, **overrides
    ) -> list[list[tuple[str, float]]]:
        """Per query, the top-k (page_id, score) of the loaded shards, by score then index order.

        ``overrides``: search-time IndexConfig fields (nprobe, ef_search, k_tokens, n_rerank, compute_dtype,
        rescore).
        """
        mode = IndexMode.parse(mode, "mode")
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        cfg = dataclasses.replace(self.cfg, **overrides)
        if mode == IndexMode.APPROX and cfg.approx == FaissKind.NONE:
            raise ValueError("this index was built with approx='none': only exact search is available")
        queries = pad_queries(list(query_embeddings), self.dim, self._device)
        per_query: list[list[tuple[int, float]]] = [[] for _ in range(len(queries))]
        block = max(1, _MAX_QUERY_COLUMNS // queries.shape[1])
        for shard in self.shards:
            for q0 in range(0, len(queries), block):
                qs = queries[q0 : q0 + block]
                if mode == IndexMode.EXACT:
                    found = exact_search(shard, qs, cfg, top_k)
                else:
                    found = approx.search(shard, qs, cfg, top_k)
                for j, (idx, vals) in enumerate(found):
                    per_query[q0 + j] += zip(shard.positions[idx].tolist(), vals.tolist())
        return [
            [(self.all_page_ids[p], s) for p, s in sorted(hits, key=lambda h: (-h[1], h[0]))[:top_k]]
            for hits in per_query
        ]


def exact_search(shard: Shard, queries: Tensor, cfg: IndexConfig, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query of the zero-padded batch (B, Lq, d): storage indices and scores of its top k pages of the shard."""
    compute = getattr(torch, cfg.compute_dtype)
    scores = maxsim(shard.vectors, shard.chunks, shard.n_pages, queries, compute)
    if compute == torch.float32:
        return [top_k_ties(scores[:, j], shard.positions, k) for j in range(len(queries))]
    # The bf16 scan proposes its best pages; float32 scores and orders them.
    best = [top_k_ties(scores[:, j], shard.positions, max(cfg.rescore, k))[0] for j in range(len(queries))]
    return [approx.rerank(shard, b, queries[j : j + 1], k, cfg.chunk_tokens) for j, b in enumerate(best)]


def embed_pages(records, embedder) -> Iterator[tuple[str, str, Tensor]]:
    """(page_id, checksum, embedding) per page, embedding a few images at a time (pages can be large); any
    embedder with ``cfg.batch_size`` and ``embed_images`` (ColQwen2's token vectors, or one CLIP vector)."""
    from PIL import Image

    step = embedder.cfg.batch_size * 4
    for start in range(0, len(records), step):
        group = records[start : start + step]
        images = []
        for r in group:
            with Image.open(r.file) as im:
                images.append(im.convert("RGB"))
        for r, vectors in zip(group, embedder.embed_images(images)):
            yield r.page_id, page_checksum(r), vectors


# ---- CLI -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    from vrag_rl.retrieval.embed import EmbedderConfig, PageEmbedder

    p = argparse.ArgumentParser(prog="python -m vrag_rl.retrieval.index", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("build", "add"):
        s = sub.add_parser(name, help="build a new index" if name == "build" else "index the corpus's new pages")
        s.add_argument("--corpus", required=True, help="corpus directory (pages.parquet + pages/)")
        s.add_argument("--model", required=True, help="ColQwen2 / ColQwen2.5 model directory")
        s.add_argument("--device", default="cpu")
        s.add_argument("--dtype", default="auto", help="embedding dtype; auto = float32 on CPU, bfloat16 on GPU")
        s.add_argument("--batch-size", type=int, default=4)
        s.add_argument("--pool-factor", type=int, default=1, help="hierarchical token pooling factor (1 = off)")
        if name == "build":
            s.add_argument("--out", required=True, help="index directory to create")
            s.add_argument("--shard-size", type=int, default=IndexConfig.shard_size, help="pages per shard")
            s.add_argument("--store-dtype", choices=["float16", "float32"], default=IndexConfig.dtype)
            s.add_argument("--approx", choices=MULTI_VECTOR_KINDS, default=IndexConfig.approx)
            s.add_argument("--nlist", type=int, default=0, help="IVF lists per shard (0 = auto)")
            s.add_argument("--ivf-codec", default="Flat", help="FAISS codec of the IVF lists: Flat, SQ8, PQ16, ...")
            s.add_argument(
                "--compute-dtype",
                choices=["float32", "bfloat16"],
                default=IndexConfig.compute_dtype,
                help="exact search's scan (kept with the index); bfloat16 where the CPU has AMX / avx512_bf16",
            )
        else:
            s.add_argument("--index", required=True, help="existing index directory")
    a = p.parse_args(argv)
    embedder = PageEmbedder(EmbedderConfig(a.model, a.device, a.dtype, a.batch_size, a.pool_factor))
    if a.cmd == "build":
        cfg = IndexConfig(
            shard_size=a.shard_size,
            dtype=a.store_dtype,
            approx=a.approx,
            nlist=a.nlist,
            ivf_codec=a.ivf_codec,
            compute_dtype=a.compute_dtype,
        )
        index = MultiVectorIndex.build(a.out, a.corpus, embedder, cfg)
        print(f"indexed {len(index.page_ids)} pages in {index.num_shards} shards: {a.out}")
    else:
        index = MultiVectorIndex.load(a.index, expected_fingerprint=embedder.fingerprint)
        known = set(index.all_page_ids)
        new = [r.page_id for r in load_pages(a.corpus) if r.page_id not in known]
        index.add_pages(a.corpus, new, embedder)
        print(f"added {len(new)} pages; the index now has {len(index.all_page_ids)} pages in {index.num_shards} shards")


if __name__ == "__main__":
    main()
