"""What every retriever shares: the corpus's page catalog, the optional BM25 text and single-vector indexes,
and the search logic.

``BaseRetriever`` ties together the corpus manifest (``pages.parquet``), an embedder for queries, optionally
a BM25 index over the pages' OCR text and optionally a single-vector CLIP / SigLIP index (``dense_index.py``,
small enough to live in this process); subclasses supply the ColQwen2 visual top-k: ``LocalRetriever``
(``local.py``, the whole index in this process) and ``DistributedRetriever`` (``actor.py``, shards on Ray
actors). Results are ``Hit`` lists ranked by score with ties broken by the index's page order (corpus order
at build time), so two runs, and both subclasses, give the same list. ``page_path`` is the only way a page id
becomes a file path, and it refuses anything that is not a manifest page whose file lies inside the corpus
directory.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

from PIL import Image
from torch import Tensor

from vrag_rl.data.records import load_pages
from vrag_rl.retrieval.bm25 import BM25Index
from vrag_rl.retrieval.dense import DenseConfig, DenseEmbedder
from vrag_rl.retrieval.dense_index import SingleVectorIndex
from vrag_rl.retrieval.embed import EmbedderConfig, PageEmbedder
from vrag_rl.retrieval.fusion import reciprocal_rank_fusion
from vrag_rl.retrieval.ocr import OCR_FILE, load_ocr, stale_ocr
from vrag_rl.retrieval.types import Hit, SearchMode, SearchSettings

log = logging.getLogger(__name__)
IMAGE_MODES = [SearchMode.VISUAL, SearchMode.DENSE, SearchMode.HYBRID]  # the indexes of page images


class PageCatalog:
    """The corpus manifest: page ids in corpus order and their files, resolved only inside the corpus."""

    def __init__(self, corpus_dir: str | Path):
        self.root = Path(corpus_dir).resolve()
        if not (self.root / "pages.parquet").is_file():
            raise FileNotFoundError(f"{self.root} has no pages.parquet: not a page corpus (see retrieval.ingest)")
        pages = load_pages(self.root)
        self.page_ids: list[str] = [p.page_id for p in pages]
        if len(set(self.page_ids)) != len(self.page_ids):
            raise ValueError(f"{self.root}/pages.parquet lists a page id twice")
        # load_pages joins the stored file to the corpus directory; kept unresolved here, checked on use.
        self._files: dict[str, Path] = {p.page_id: Path(p.file) for p in pages}

    def __contains__(self, page_id: object) -> bool:
        return isinstance(page_id, str) and page_id in self._files

    def page_path(self, page_id: str) -> Path:
        """The page image of a manifest page id.

        Raises KeyError for ids not in the manifest (whatever they look like: ``..``, slashes and absolute
        paths are simply not page ids), ValueError when the file resolves outside the corpus (a symlink or
        a manifest entry pointing elsewhere), FileNotFoundError when the file is gone.
        """
        if page_id not in self:
            raise KeyError(f"unknown page id {page_id!r}")
        path = self._files[page_id].resolve(strict=True)
        if not path.is_relative_to(self.root):
            raise ValueError(f"page {page_id!r} resolves outside the corpus {self.root}")
        return path

    def hits(self, ranked: list[tuple[str, float]]) -> list[Hit]:
        return [Hit(pid, float(score), str(self._files[pid])) for pid, score in ranked]


def load_text_index(corpus_dir: Path, text_index: BM25Index | str | Path | None) -> BM25Index | None:
    """A BM25 index given as an object or a saved file; otherwise built from CORPUS/ocr.parquet when present."""
    if isinstance(text_index, BM25Index):
        return text_index
    if text_index is not None:
        return BM25Index.load(text_index)
    if not (corpus_dir / OCR_FILE).is_file():
        return None
    rows = load_ocr(corpus_dir)  # failed pages have empty text: indexed, never matched
    stale = stale_ocr(load_pages(corpus_dir), rows)
    if stale:
        named = "; ".join(f"{len(v)} {k} (e.g. {', '.join(v[:3])})" for k, v in stale.items())
        raise ValueError(
            f"{corpus_dir / OCR_FILE} does not match the page manifest: {named}. Run "
            f"`python -m vrag_rl.retrieval.ocr {corpus_dir}` (it reads only those pages again)"
        )
    index = BM25Index()
    index.build([r.page_id for r in rows], [r.text for r in rows])
    return index


class BaseRetriever(ABC):
    """Search logic shared by the in-process and the Ray retriever; subclasses supply the visual top-k.

    ``text_index``: a BM25 index, or its saved file (default: built from the corpus's OCR layer, if any);
    ``dense``: the single-vector index to search beside ColQwen2's (modes ``dense`` and ``hybrid``);
    ``settings``: how every query is searched (index mode, hybrid fusion).
    """

    def __init__(
        self,
        corpus_dir: str | Path,
        embedder: PageEmbedder,
        text_index: BM25Index | str | Path | None = None,
        dense: DenseConfig | None = None,
        settings: SearchSettings = SearchSettings(),
    ):
        self.settings = settings
        self.catalog = PageCatalog(corpus_dir)
        self.embedder = embedder
        self.text_index = load_text_index(self.catalog.root, text_index)
        if self.text_index is not None:
            self._check_foreign("text index", self.text_index.page_ids)
        self.dense_embedder = self.dense_index = None
        if dense is not None:  # a stale index, or one of another model, fails here
            self.dense_embedder = DenseEmbedder(dense)
            fingerprint = self.dense_embedder.fingerprint
            self.dense_index = SingleVectorIndex.load(dense.index_dir, fingerprint, self.catalog.root)

    @property
    def page_ids(self) -> list[str]:
        return self.catalog.page_ids

    def page_path(self, page_id: str) -> Path:
        return self.catalog.page_path(page_id)

    @abstractmethod
    def _visual_topk(self, embeddings: list[Tensor], top_k: int) -> list[list[tuple[str, float]]]:
        """Per query embedding, the top-k (page_id, score) of the visual index, ties in index order."""

    def _check_foreign(self, what: str, page_ids: list[str]) -> None:
        foreign = [pid for pid in page_ids if pid not in self.catalog]
        if foreign:
            raise ValueError(
                f"the {what} holds {len(foreign)} pages that are not in the corpus {self.catalog.root} "
                f"(e.g. {foreign[:3]}): it was built from another corpus or an older manifest"
            )

    def modes(self) -> list[SearchMode]:
        """The search modes this retriever answers: visual always, the others with their indexes."""
        modes = [SearchMode.VISUAL]
        modes += [SearchMode.TEXT] if self.text_index is not None else []
        modes += [SearchMode.DENSE] if self.dense_index is not None else []
        return modes + [SearchMode.HYBRID] if len(modes) > 1 else modes

    def check_mode(self, mode: str, images: bool = False) -> SearchMode:
        """``mode`` as a member when this retriever answers it for text queries (or ``images``), else
        ValueError saying which index it needs."""
        mode = SearchMode.parse(mode, "mode")
        allowed = IMAGE_MODES if images else list(SearchMode)
        if mode in allowed and mode in self.modes():
            return mode
        needs = {
            SearchMode.TEXT: "a text index: OCR the corpus (python -m vrag_rl.retrieval.ocr) or pass one",
            SearchMode.DENSE: "a single-vector index: build one (python -m vrag_rl.retrieval.dense_index) and pass it",
            SearchMode.HYBRID: "a second index to fuse with ColQwen2's: a text index (OCR) or a single-vector one",
        }
        if mode in allowed:
            raise ValueError(f"mode '{mode}' needs {needs[mode]}")
        raise ValueError(f"mode '{mode}' is not one of {[str(m) for m in allowed]} for image queries")

    def search(self, queries: list[str], top_k: int = 5, mode: str = SearchMode.VISUAL) -> list[list[Hit]]:
        """Ranked pages per text query: ``visual`` (ColQwen2 MaxSim), ``text`` (BM25 over OCR), ``dense``
        (the single-vector index) or ``hybrid`` (reciprocal rank fusion of every index's ranking)."""
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings, not one string")
        mode = self.check_mode(mode)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not queries:
            return []
        rankers = {
            SearchMode.VISUAL: lambda k: self._visual_topk(self.embedder.embed_queries(queries), k),
            SearchMode.TEXT: lambda k: self.text_index.search(queries, k),  # BM25 breaks ties in corpus order
            SearchMode.DENSE: lambda k: self.dense_index.search(self.dense_embedder.embed_queries(queries), k),
        }
        return self._ranked(rankers, mode, top_k)

    def search_by_image(self, images: list[Image.Image], top_k: int = 5, mode: str = SearchMode.VISUAL):
        """Ranked pages per query image (a page, a crop, a photo): ``visual``, ``dense`` or ``hybrid`` of both."""
        mode = self.check_mode(mode, images=True)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not images:
            return []
        rankers = {SearchMode.VISUAL: lambda k: self._visual_topk(self.embedder.embed_images(list(images)), k)}
        if self.dense_index is not None:
            rankers[SearchMode.DENSE] = lambda k: self.dense_index.search(self.dense_embedder.embed_images(images), k)
        if mode == SearchMode.HYBRID and len(rankers) < 2:
            raise ValueError("image mode 'hybrid' fuses the ColQwen2 and the single-vector index: pass a dense one")
        return self._ranked(rankers, mode, top_k)

    def _ranked(self, rankers: dict, mode: SearchMode, top_k: int) -> list[list[Hit]]:
        """One ranker's top-k, or (hybrid) every available ranker's top-depth fused by exact RRF, whose tie
        rule (best rank reached, earlier ranking first: visual, text, dense) is deterministic on its own."""
        if mode != SearchMode.HYBRID:
            return [self.catalog.hits(r) for r in rankers[mode](top_k)]
        depth = max(top_k, self.settings.fusion_depth)  # deeper = steadier fusion
        rankings = [ranker(depth) for m, ranker in rankers.items() if m in self.modes()]
        fused = []
        for per_query in zip(*rankings):
            lists = [[pid for pid, _ in ranking] for ranking in per_query]
            fused.append(self.catalog.hits(reciprocal_rank_fusion(lists, k=self.settings.rrf_k, top_k=top_k)))
        return fused


def as_embedder(embedder: EmbedderConfig | PageEmbedder) -> PageEmbedder:
    """Load the model of a config; an already loaded embedder is used as is (shared, not loaded twice)."""
    return embedder if isinstance(embedder, PageEmbedder) else PageEmbedder(embedder)
