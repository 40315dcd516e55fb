"""The in-process retriever: the whole visual index in this process (``LocalRetriever``).

Search logic, the page catalog and the text index are ``BaseRetriever``'s (``base.py``); the Ray version with
the index's shards spread over actors is ``actor.DistributedRetriever``, and both return the same lists.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from vrag_rl.retrieval.base import BaseRetriever, as_embedder
from vrag_rl.retrieval.bm25 import BM25Index
from vrag_rl.retrieval.dense import DenseConfig
from vrag_rl.retrieval.embed import EmbedderConfig, PageEmbedder
from vrag_rl.retrieval.index import MultiVectorIndex
from vrag_rl.retrieval.types import SearchSettings


class LocalRetriever(BaseRetriever):
    """Single-process retriever: the whole visual index in this process.

    ``embedder``: the ``EmbedderConfig`` of the model the index was built with, or that model already loaded;
    ``text_index``, ``dense`` and ``settings`` as for ``BaseRetriever``.
    """

    def __init__(
        self,
        corpus_dir: str | Path,
        index_dir: str | Path,
        embedder: EmbedderConfig | PageEmbedder,
        text_index: BM25Index | str | Path | None = None,
        dense: DenseConfig | None = None,
        settings: SearchSettings = SearchSettings(),
    ):
        super().__init__(corpus_dir, as_embedder(embedder), text_index, dense, settings)
        # A stale index (pages added, removed or changed since it was built) or another model's fails here.
        self.index = MultiVectorIndex.load(
            index_dir, expected_fingerprint=self.embedder.fingerprint, corpus_dir=self.catalog.root
        )

    def _visual_topk(self, embeddings: list[Tensor], top_k: int) -> list[list[tuple[str, float]]]:
        return self.index.search(embeddings, top_k, self.settings.index_mode)
