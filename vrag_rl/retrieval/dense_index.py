"""The single-vector page index: one L2-normalised vector per page in one FAISS inner-product index.

On disk (``INDEX/``)::

    manifest.json     format version, embedder fingerprint, build config, every page id with its image checksum
                      (the index order = tie-break order), a checksum of that list, the FAISS file's sha256
    pages.faiss       IndexFlatIP (exact), IVF{nlist},Flat or HNSW{m},Flat over the page vectors, row i = page i

One vector per page is small (768 float32 = 3 KiB per page: 10k pages in 30 MiB), so the index is not
sharded: it lives beside the query embedder in the retriever's front process. ``exact`` scores every page and
suits corpora up to ~100k pages; ``ivf`` and ``hnsw`` trade a little recall for speed beyond that. Scores are
cosines; equal scores rank in index order. The manifest is written last: its presence means the index is
complete.

    python -m vrag_rl.retrieval.dense_index build --corpus C --model DIR --out I [--kind exact|ivf|hnsw]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vrag_rl.data.records import atomic_write_bytes, load_pages, sha256_file, temp_path, writer_lock
from vrag_rl.retrieval.approx import auto_nlist, import_faiss
from vrag_rl.retrieval.dense import DenseConfig, DenseEmbedder
from vrag_rl.retrieval.index import embed_pages
from vrag_rl.retrieval.store import MANIFEST, StaleIndexError, pages_checksum, read_manifest
from vrag_rl.retrieval.types import SINGLE_VECTOR_KINDS, FaissKind

FORMAT = "vrag-rl.single-vector-index"
FORMAT_VERSION = 1
FAISS_FILE = "pages.faiss"


@dataclass(frozen=True)
class DenseIndexConfig:
    kind: str = FaissKind.EXACT  # "exact", "ivf" or "hnsw"
    nlist: int = 0  # IVF lists; 0 = about sqrt(n_pages), a power of two
    hnsw_m: int = 32
    ef_construction: int = 80
    nprobe: int = 16  # search-time: IVF lists visited, HNSW candidate list length
    ef_search: int = 64

    def __post_init__(self):
        object.__setattr__(self, "kind", FaissKind.parse_among(self.kind, "kind", SINGLE_VECTOR_KINDS))
        if min(self.nprobe, self.ef_search, self.hnsw_m, self.ef_construction) < 1 or self.nlist < 0:
            raise ValueError("nprobe, ef_search, hnsw_m, ef_construction must be >= 1 and nlist >= 0")


def _faiss_index(vectors: np.ndarray, cfg: DenseIndexConfig):
    faiss = import_faiss()
    n, d = vectors.shape
    if cfg.kind == FaissKind.EXACT:
        index = faiss.IndexFlatIP(d)
    elif cfg.kind == FaissKind.HNSW:
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
    else:
        nlist = min(cfg.nlist or auto_nlist(n), n)
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        rows = np.sort(np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False))  # seeded training
        index.train(vectors[rows])
    index.add(vectors)
    return index


class SingleVectorIndex:
    """Load with ``SingleVectorIndex.load``; make with ``build`` (a corpus) or ``create`` (given vectors)."""

    def __init__(self, index_dir: Path, manifest: dict, faiss_index):
        self.dir = index_dir
        self.manifest = manifest
        self.cfg = DenseIndexConfig(**manifest["config"])
        self.faiss_index = faiss_index
        self.page_ids: list[str] = [pid for pid, _ in manifest["pages"]]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def bytes_per_page(self) -> float:
        return (self.dir / FAISS_FILE).stat().st_size / len(self.page_ids)

    @classmethod
    def build(cls, out_dir, corpus_dir, embedder: DenseEmbedder, cfg=DenseIndexConfig(), progress: bool = True):
        """Embed every page of the corpus manifest (in its order) and write the index."""
        from vrag_rl.progress import progress_bar

        pages = load_pages(corpus_dir)
        if not pages:
            raise ValueError(f"corpus {corpus_dir} has no pages")
        rows = list(
            progress_bar(embed_pages(pages, embedder), total=len(pages), desc="embed pages", disable=not progress)
        )
        vectors = np.stack([v for _, _, v in rows])
        return cls.create(out_dir, [(pid, cs) for pid, cs, _ in rows], vectors, embedder.fingerprint, cfg)

    @classmethod
    def create(cls, out_dir, pages: list[tuple[str, str]], vectors: np.ndarray, fingerprint: str, cfg=None):
        """Write an index of (page_id, image checksum) with their vectors (n, dim), rows in index order."""
        out_dir, cfg = Path(out_dir), cfg or DenseIndexConfig()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(pages) or not len(pages):
            raise ValueError(f"expected one vector per page for {len(pages)} pages, got shape {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("page vectors hold NaN/inf values")
        if len({pid for pid, _ in pages}) != len(pages):
            raise ValueError("a page id is given twice")
        with writer_lock(out_dir, "index"):
            if (out_dir / MANIFEST).exists():
                raise FileExistsError(f"{out_dir} already holds an index; remove it to rebuild")
            tmp = temp_path(out_dir / FAISS_FILE)
            import_faiss().write_index(_faiss_index(vectors, cfg), str(tmp))
            tmp.replace(out_dir / FAISS_FILE)
            listed = [[pid, cs] for pid, cs in pages]
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "dim": int(vectors.shape[1]),
                "config": dataclasses.asdict(cfg),
                "pages": listed,
                "corpus_checksum": pages_checksum(listed),
                "faiss_sha256": sha256_file(out_dir / FAISS_FILE),
            }
            atomic_write_bytes(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
        return cls.load(out_dir, verify=False)

    @classmethod
    def load(cls, index_dir, expected_fingerprint: str | None = None, corpus_dir=None, verify: bool = True):
        """Open an index, checking its manifest, (``verify``) its FAISS file's sha256, the query embedder's
        fingerprint and (``corpus_dir``) that it holds exactly the corpus's current pages."""
        index_dir = Path(index_dir)
        manifest = read_manifest(
            index_dir,
            FORMAT,
            FORMAT_VERSION,
            expected_fingerprint=expected_fingerprint,
            corpus_dir=corpus_dir,
            name="single-vector index",
        )
        path = index_dir / FAISS_FILE
        if not path.is_file() or (verify and sha256_file(path) != manifest["faiss_sha256"]):
            raise StaleIndexError("checksum", f"{path} is missing or does not match its sha256: rebuild the index")
        index = cls(index_dir, manifest, import_faiss().read_index(str(path)))
        if index.faiss_index.ntotal != len(index.page_ids) or index.faiss_index.d != manifest["dim"]:
            raise StaleIndexError("checksum", f"{path} disagrees with the manifest's page count or dimension")
        return index

    def search(self, queries: np.ndarray, top_k: int, **overrides) -> list[list[tuple[str, float]]]:
        """Per query vector, the top-k (page_id, cosine), by score then index order.

        ``overrides``: search-time config fields (nprobe, ef_search)."""
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        cfg = dataclasses.replace(self.cfg, **overrides)
        faiss = import_faiss()
        params = None
        if cfg.kind == FaissKind.IVF:
            params = faiss.SearchParametersIVF(nprobe=cfg.nprobe)
        elif cfg.kind == FaissKind.HNSW:
            params = faiss.SearchParametersHNSW(efSearch=cfg.ef_search)
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.manifest["dim"])
        scores, rows = self.faiss_index.search(queries, min(top_k, len(self.page_ids)), params=params)
        out = []
        for s, r in zip(scores, rows):
            found = sorted((-float(v), int(i)) for v, i in zip(s, r) if i >= 0)
            out.append([(self.page_ids[i], -neg) for neg, i in found])
        return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vrag_rl.retrieval.dense_index", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("build", help="embed the corpus's pages and write the index")
    s.add_argument("--corpus", required=True, help="corpus directory (pages.parquet + pages/)")
    s.add_argument("--model", required=True, help="CLIP or SigLIP checkpoint directory")
    s.add_argument("--out", required=True, help="index directory to create")
    s.add_argument("--kind", choices=SINGLE_VECTOR_KINDS, default=FaissKind.EXACT)
    s.add_argument("--nlist", type=int, default=0, help="IVF lists (0 = auto)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="auto", help="embedding dtype; auto = float32 on CPU, bfloat16 on GPU")
    s.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)
    embedder = DenseEmbedder(DenseConfig(a.model, a.out, a.device, a.dtype, a.batch_size))
    index = SingleVectorIndex.build(a.out, a.corpus, embedder, DenseIndexConfig(kind=a.kind, nlist=a.nlist))
    print(f"indexed {len(index.page_ids)} pages ({index.bytes_per_page:.0f} bytes each): {a.out}")


if __name__ == "__main__":
    main()
