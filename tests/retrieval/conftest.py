"""Shared retrieval fixtures: the tiny ColQwen2 embedder and a visual index of the bundled corpus.

The index is built once per session in a temporary directory and must be treated as read-only: tests
that change an index copy it first. It stores float32 vectors so that scores equal colpali-engine's
scorer run on freshly computed embeddings (float16 storage moves scores by ~1e-3, enough to swap the
many near-ties of a random model). Shards of 8 pages: the 24 bundled pages make 3 shards.
"""

from pathlib import Path

import pytest

BUNDLED_SHARD_SIZE = 8


@pytest.fixture(scope="session")
def embedder_cfg(tiny_dirs):
    from vrag_rl.retrieval.embed import EmbedderConfig

    return EmbedderConfig(model_dir=str(tiny_dirs["retriever"]), device="cpu", dtype="float32", batch_size=4)


@pytest.fixture(scope="session")
def embedder(embedder_cfg):
    from vrag_rl.retrieval.embed import PageEmbedder

    return PageEmbedder(embedder_cfg)


@pytest.fixture(scope="session")
def bundled_index(bundled_corpus, embedder, tmp_path_factory) -> Path:
    """Index directory of data/synthetic-small (exact + IVF approximate), read-only."""
    from vrag_rl.retrieval.index import IndexConfig, MultiVectorIndex

    out = tmp_path_factory.mktemp("bundled_index") / "index"
    cfg = IndexConfig(shard_size=BUNDLED_SHARD_SIZE, dtype="float32", approx="ivf")
    MultiVectorIndex.build(out, bundled_corpus, embedder, cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def visual_index(bundled_index) -> Path:
    """Alias of ``bundled_index`` (the name the serving tests use)."""
    return bundled_index
