"""The cached page index of a corpus: built on first use, rebuilt when the corpus or the model changes.

A corpus's cached index lives in ``CACHE/index/NAME-PATH-MANIFEST``: keyed by the corpus's resolved path and
the digest of its manifest (``pages.parquet``), so two corpora that share a folder name never share an index,
and an edited corpus gets a new one (the superseded index of the same path is removed when it is built). An
index built by another retriever model is caught by its fingerprint on load and rebuilt. A user's own index
(``index`` given) is never rebuilt behind their back.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from vrag_rl.data.paths import cache_dir
from vrag_rl.retrieval.embed import EmbedderConfig, PageEmbedder
from vrag_rl.retrieval.index import MultiVectorIndex
from vrag_rl.retrieval.local import LocalRetriever
from vrag_rl.retrieval.store import StaleIndexError
from vrag_rl.retrieval.types import ApproxKind, IndexConfig

log = logging.getLogger(__name__)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:10]


def cached_index_dir(corpus: str | Path, cache: Path | None = None) -> Path:
    """Where the cache keeps the index of ``corpus`` as it is now."""
    root = Path(corpus).resolve()
    manifest = root / "pages.parquet"
    if not manifest.is_file():
        raise FileNotFoundError(f"{root} has no pages.parquet: not a page corpus (see retrieval.ingest)")
    name = f"{root.name}-{_digest(str(root).encode())}-{_digest(manifest.read_bytes())}"
    return (cache or cache_dir()) / "index" / name


def open_retriever(corpus: str | Path, index: str | Path | None, retriever_model: str) -> LocalRetriever:
    """The corpus's in-process retriever over ``index``, or over its cached index, (re)built when missing or stale;
    its BM25 text index comes from the corpus's OCR layer when there is one."""
    embedder = PageEmbedder(EmbedderConfig(model_dir=retriever_model, device="cpu", dtype="float32"))
    if index is not None:
        return LocalRetriever(corpus, index, embedder)
    index = cached_index_dir(corpus)
    try:
        return LocalRetriever(corpus, index, embedder)
    except (FileNotFoundError, StaleIndexError) as err:
        log.info("building the page index in %s (%s)", index, type(err).__name__)
    for superseded in index.parent.glob(index.name.rsplit("-", 1)[0] + "-*"):
        shutil.rmtree(superseded, ignore_errors=True)
    MultiVectorIndex.build(index, corpus, embedder, IndexConfig(dtype="float32", approx=ApproxKind.NONE))
    return LocalRetriever(corpus, index, embedder)


def ensure_index(corpus: str | Path, index: str | Path | None, retriever_model: str) -> Path:
    """``index`` as given, or the corpus's cached index, (re)built when missing or stale."""
    if index is not None:
        return Path(index)
    open_retriever(corpus, None, retriever_model)
    return cached_index_dir(corpus)
