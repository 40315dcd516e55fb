"""A corpus's indexes, ready to search: its cached page index (``ensure_index``), its cached single-vector index
(``ensure_dense_index``) and an in-process retriever over them (``open_retriever``). A cached index is built on
first use and rebuilt when the corpus or the model changes.

A corpus's cached index lives in ``CACHE/index/NAME-PATH-MANIFEST`` (its single-vector index, when one is
asked for, in ``CACHE/dense/NAME-PATH-MANIFEST``): keyed by the corpus's resolved path and
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
from vrag_rl.retrieval.dense import DenseConfig, DenseEmbedder, dense_fingerprint
from vrag_rl.retrieval.dense_index import SingleVectorIndex
from vrag_rl.retrieval.embed import EmbedderConfig, PageEmbedder, model_fingerprint
from vrag_rl.retrieval.index import MultiVectorIndex
from vrag_rl.retrieval.local import LocalRetriever
from vrag_rl.retrieval.store import StaleIndexError
from vrag_rl.retrieval.types import FaissKind, IndexConfig

log = logging.getLogger(__name__)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:10]


def cached_index_dir(corpus: str | Path, cache: Path | None = None, kind: str = "index") -> Path:
    """Where the cache keeps the index (``kind`` index or dense) of ``corpus`` as it is now."""
    root = Path(corpus).resolve()
    manifest = root / "pages.parquet"
    if not manifest.is_file():
        raise FileNotFoundError(f"{root} has no pages.parquet: not a page corpus (see retrieval.ingest)")
    name = f"{root.name}-{_digest(str(root).encode())}-{_digest(manifest.read_bytes())}"
    return (cache or cache_dir()) / kind / name


def _clear_superseded(index: Path) -> None:
    """Remove the cached indexes of the same corpus path (older manifests) before building ``index``."""
    for superseded in index.parent.glob(index.name.rsplit("-", 1)[0] + "-*"):
        shutil.rmtree(superseded, ignore_errors=True)


def _current_index(corpus: str | Path, retriever_model: str, embedder: PageEmbedder | None = None) -> Path:
    """The corpus's cached index, (re)built when missing, stale or of another model."""
    index = cached_index_dir(corpus)
    try:  # the manifest alone: fingerprint and pages (LocalRetriever checks the shard files' sha256)
        MultiVectorIndex.load(
            index, shards=[], expected_fingerprint=model_fingerprint(retriever_model, 1), corpus_dir=corpus
        )
        return index
    except (FileNotFoundError, StaleIndexError) as err:
        log.info("building the page index in %s (%s)", index, type(err).__name__)
    _clear_superseded(index)
    embedder = embedder or PageEmbedder(_embedder_config(retriever_model))
    MultiVectorIndex.build(index, corpus, embedder, IndexConfig(dtype="float32", approx=FaissKind.NONE))
    return index


def _embedder_config(retriever_model: str) -> EmbedderConfig:
    return EmbedderConfig(model_dir=retriever_model, device="cpu", dtype="float32")


def open_retriever(
    corpus: str | Path, index: str | Path | None, retriever_model: str, dense: DenseConfig | None = None
) -> LocalRetriever:
    """The corpus's in-process retriever over ``index``, or over its cached index (``ensure_index``); its BM25
    text index comes from the corpus's OCR layer when there is one; ``dense``: its single-vector index."""
    embedder = PageEmbedder(_embedder_config(retriever_model))
    index = index if index is not None else _current_index(corpus, retriever_model, embedder)
    return LocalRetriever(corpus, index, embedder, dense=dense)


def ensure_index(corpus: str | Path, index: str | Path | None, retriever_model: str) -> Path:
    """``index`` as given, or the corpus's cached index, (re)built when missing or stale."""
    return Path(index) if index is not None else _current_index(corpus, retriever_model)


def ensure_dense_index(corpus: str | Path, index: str | Path | None, model: str) -> DenseConfig:
    """The single-vector retriever of ``corpus`` with ``model``: over ``index`` as given, or over the corpus's
    cached single-vector index, (re)built when missing, stale or of another model."""
    if index is not None:
        return DenseConfig(model, str(index))
    cfg = DenseConfig(model, str(cached_index_dir(corpus, kind="dense")))
    try:
        SingleVectorIndex.load(cfg.index_dir, dense_fingerprint(model), corpus)
    except StaleIndexError as err:
        log.info("building the single-vector index in %s (%s)", cfg.index_dir, err.reason)
        _clear_superseded(Path(cfg.index_dir))
        SingleVectorIndex.build(cfg.index_dir, corpus, DenseEmbedder(cfg))
    return cfg
