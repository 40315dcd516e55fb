"""The single-vector retriever: CLIP / SigLIP embeddings against the models' own logits, the FAISS index
(exact, IVF, HNSW) against brute force, its checks on disk, and search by text and image, alone and fused."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vrag_rl.data.records import load_pages, page_checksum, write_pages
from vrag_rl.retrieval.dense import DenseConfig, DenseEmbedder, dense_family
from vrag_rl.retrieval.dense_index import FAISS_FILE, DenseIndexConfig, SingleVectorIndex, main
from vrag_rl.retrieval.fusion import reciprocal_rank_fusion
from vrag_rl.retrieval.local import LocalRetriever
from vrag_rl.retrieval.store import StaleIndexError

QUERIES = ["annual revenue table", "Lagas Dynamics research centre", "bar chart of sales", "who founded it"]


def page_images(corpus, n=None) -> list[Image.Image]:
    return [Image.open(p.file).convert("RGB") for p in load_pages(corpus)[:n]]


def brute_force(vectors: np.ndarray, queries: np.ndarray, page_ids: list[str], k: int) -> list[list[tuple]]:
    """Every score computed, ranked by (-score, index order)."""
    out = []
    for scores in queries @ vectors.T:
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]
        out.append([(page_ids[i], float(scores[i])) for i in order])
    return out


def same_ranking(got, want):
    assert [[p for p, _ in q] for q in got] == [[p for p, _ in q] for q in want]
    for g, w in zip(got, want):
        assert [s for _, s in g] == pytest.approx([s for _, s in w], abs=1e-5)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def family_embedder(request, tiny_dirs):
    return DenseEmbedder(DenseConfig(str(tiny_dirs[request.param]), index_dir="unused"))


@pytest.fixture(scope="module")
def clip(tiny_dirs):
    return DenseEmbedder(DenseConfig(str(tiny_dirs["clip"]), index_dir="unused", batch_size=8))


@pytest.fixture(scope="module")
def dense_dir(bundled_corpus, clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "index"
    SingleVectorIndex.build(out, bundled_corpus, clip, progress=False)
    return out


@pytest.fixture(scope="module")
def dense_retriever(bundled_corpus, bundled_index, embedder, dense_dir, tiny_dirs):
    dense = DenseConfig(str(tiny_dirs["clip"]), str(dense_dir))
    return LocalRetriever(bundled_corpus, bundled_index, embedder, dense=dense)


# ---- embeddings ---------------------------------------------------------------------------------------------
def test_cosines_are_the_models_own_logits_unscaled(family_embedder, bundled_corpus):
    """``model(**inputs).logits_per_text`` is scale * cosine (+ bias for SigLIP): the model's forward is the
    oracle for both towers, the pooling, the projection and the normalisation."""
    e = family_embedder
    images = page_images(bundled_corpus, 5)
    padding = "max_length" if e.family == "siglip" else True  # each family's documented use; CLIP pools its EOS
    inputs = e.processor(text=QUERIES, images=images, padding=padding, return_tensors="pt")
    with torch.no_grad():
        logits = e.model(**inputs).logits_per_text.numpy()
    scale = e.model.logit_scale.exp().item()
    bias = e.model.logit_bias.item() if e.family == "siglip" else 0.0
    cosines = e.embed_queries(QUERIES) @ e.embed_images(images).T
    np.testing.assert_allclose(cosines * scale + bias, logits, rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(e.embed_images(images), axis=1) == pytest.approx(1.0, abs=1e-5)


def test_batches_do_not_change_the_vectors(tiny_dirs, bundled_corpus):
    images = page_images(bundled_corpus, 6)
    one = DenseEmbedder(DenseConfig(str(tiny_dirs["clip"]), "unused", batch_size=1))
    four = DenseEmbedder(DenseConfig(str(tiny_dirs["clip"]), "unused", batch_size=4))
    np.testing.assert_allclose(one.embed_images(images), four.embed_images(images), atol=1e-5)
    np.testing.assert_allclose(one.embed_queries(QUERIES), four.embed_queries(QUERIES), atol=1e-5)
    assert one.embed_queries([]).shape == (0, one.dim) and one.embed_images([]).shape == (0, one.dim)


def test_only_image_text_checkpoints_are_read(tiny_dirs, tmp_path):
    assert dense_family(tiny_dirs["clip"]) == "clip" and dense_family(tiny_dirs["siglip"]) == "siglip"
    with pytest.raises(ValueError, match="qwen2_vl.*not a single-vector"):
        dense_family(tiny_dirs["retriever"])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dense_family(tmp_path)


# ---- the FAISS index ------------------------------------------------------------------------------------------
def random_pages(n: int, dim: int, seed: int = 0) -> tuple[list[tuple[str, str]], np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(16, dim))
    v = centres[rng.integers(0, 16, n)] + 0.5 * rng.normal(size=(n, dim))  # clustered, as real embeddings are
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return [(f"doc_{i + 1}", f"c{i}") for i in range(n)], v.astype(np.float32)


def test_exact_search_is_brute_force_with_ties_in_index_order(tmp_path):
    pages, v = random_pages(40, 16)
    v[[7, 21, 33]] = v[3]  # four pages score alike for every query
    index = SingleVectorIndex.create(tmp_path / "i", pages, v, "fp")
    queries = np.concatenate([v[[3]], random_pages(5, 16, seed=1)[1]])
    ids = [p for p, _ in pages]
    same_ranking(index.search(queries, 40), brute_force(v, queries, ids, 40))
    assert [p for p, _ in index.search(v[[3]], 4)[0]] == ["doc_4", "doc_8", "doc_22", "doc_34"]


def test_ivf_visiting_every_list_is_exact_and_hnsw_recalls_the_exact_top_10(tmp_path):
    pages, v = random_pages(3000, 32)
    queries = random_pages(50, 32, seed=2)[1]
    want = brute_force(v, queries, [p for p, _ in pages], 10)
    ivf = SingleVectorIndex.create(tmp_path / "ivf", pages, v, "fp", DenseIndexConfig(kind="ivf", nlist=32))
    same_ranking(ivf.search(queries, 10, nprobe=32), want)
    hnsw = SingleVectorIndex.create(tmp_path / "hnsw", pages, v, "fp", DenseIndexConfig(kind="hnsw"))
    found = hnsw.search(queries, 10, ef_search=128)
    recall = np.mean([len({p for p, _ in f} & {p for p, _ in w}) / 10 for f, w in zip(found, want)])
    assert recall >= 0.95
    sizes = {k: i.bytes_per_page for k, i in (("ivf", ivf), ("hnsw", hnsw))}
    assert 32 * 4 <= sizes["ivf"] < sizes["hnsw"]  # float32 rows, HNSW adds its graph links


def test_the_index_refuses_bad_vectors_and_damaged_or_foreign_files(tmp_path):
    pages, v = random_pages(20, 8)
    with pytest.raises(ValueError, match="one vector per page"):
        SingleVectorIndex.create(tmp_path / "a", pages, v[:19], "fp")
    bad = v.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SingleVectorIndex.create(tmp_path / "b", pages, bad, "fp")
    with pytest.raises(ValueError, match="twice"):
        SingleVectorIndex.create(tmp_path / "c", pages[:1] * 20, v, "fp")
    SingleVectorIndex.create(tmp_path / "i", pages, v, "fp")
    with pytest.raises(FileExistsError):
        SingleVectorIndex.create(tmp_path / "i", pages, v, "fp")
    with pytest.raises(StaleIndexError, match="another model"):
        SingleVectorIndex.load(tmp_path / "i", expected_fingerprint="other")
    with pytest.raises(StaleIndexError, match="missing"):
        SingleVectorIndex.load(tmp_path / "none")
    (tmp_path / "i" / FAISS_FILE).write_bytes((tmp_path / "i" / FAISS_FILE).read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(StaleIndexError, match="sha256"):
        SingleVectorIndex.load(tmp_path / "i")
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    manifest["pages"][0][1] = "edited"
    (tmp_path / "i" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StaleIndexError, match="edited by hand"):
        SingleVectorIndex.load(tmp_path / "i")


def test_built_from_the_corpus_in_manifest_order_and_stale_when_it_changes(dense_dir, bundled_corpus, clip, tmp_path):
    pages = load_pages(bundled_corpus)
    index = SingleVectorIndex.load(dense_dir, clip.fingerprint, bundled_corpus)
    assert index.page_ids == [p.page_id for p in pages]
    assert [cs for _, cs in index.manifest["pages"]] == [page_checksum(p) for p in pages]
    corpus = tmp_path / "corpus"
    shutil.copytree(bundled_corpus, corpus)
    write_pages(load_pages(corpus)[:-1], corpus / "pages.parquet")
    with pytest.raises(StaleIndexError, match=r"stale.*1 removed"):
        SingleVectorIndex.load(dense_dir, clip.fingerprint, corpus)


def test_the_build_command_writes_an_index_the_retriever_reads(bundled_corpus, tiny_dirs, dense_dir, tmp_path, capsys):
    main(["build", "--corpus", str(bundled_corpus), "--model", str(tiny_dirs["clip"]), "--out", str(tmp_path / "i")])
    assert "indexed 24 pages" in capsys.readouterr().out
    built = SingleVectorIndex.load(tmp_path / "i")
    assert (tmp_path / "i" / FAISS_FILE).read_bytes() == (dense_dir / FAISS_FILE).read_bytes()
    assert built.manifest["pages"] == SingleVectorIndex.load(dense_dir).manifest["pages"]


# ---- the retriever ----------------------------------------------------------------------------------------------
def test_dense_search_by_text_and_image_ranks_every_page_by_cosine(dense_retriever, clip, bundled_corpus):
    ids = dense_retriever.page_ids
    pages = clip.embed_images(page_images(bundled_corpus))  # embedded afresh, one at a time in batches of 8
    want = brute_force(pages, clip.embed_queries(QUERIES), ids, 24)
    got = dense_retriever.search(QUERIES, top_k=24, mode="dense")
    same_ranking([[(h.page_id, h.score) for h in q] for q in got], want)
    by_image = dense_retriever.search_by_image(page_images(bundled_corpus, 4), top_k=3, mode="dense")
    for hits, page_id in zip(by_image, ids):
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert page_id in [h.page_id for h in hits if h.score >= hits[0].score - 1e-5]


def test_hybrid_fuses_the_rankings_of_every_index(dense_retriever, bundled_corpus):
    """Reciprocal rank fusion (``fusion.py``, tested on its own) of the ColQwen2, BM25 and single-vector rankings."""
    assert dense_retriever.modes() == ["visual", "text", "dense", "hybrid"]
    depth = dense_retriever.settings.fusion_depth
    rankings = [dense_retriever.search(QUERIES, top_k=depth, mode=m) for m in ("visual", "text", "dense")]
    for q, hits in enumerate(dense_retriever.search(QUERIES, top_k=5, mode="hybrid")):
        want = reciprocal_rank_fusion([[h.page_id for h in r[q]] for r in rankings], k=60, top_k=5)
        assert [(h.page_id, h.score) for h in hits] == want
    images = page_images(bundled_corpus, 2)
    hybrid = dense_retriever.search_by_image(images, top_k=3, mode="hybrid")
    assert [h[0].page_id for h in hybrid] == [p.page_id for p in load_pages(bundled_corpus)[:2]]


def test_modes_need_their_index(bundled_corpus, bundled_index, embedder, dense_dir, tiny_dirs, tmp_path):
    plain = LocalRetriever(bundled_corpus, bundled_index, embedder)
    assert plain.modes() == ["visual", "text", "hybrid"]
    with pytest.raises(ValueError, match="needs a single-vector index"):
        plain.search(QUERIES, mode="dense")
    with pytest.raises(ValueError, match="'hybrid' fuses the ColQwen2 and the single-vector"):
        plain.search_by_image(page_images(bundled_corpus, 1), mode="hybrid")
    with pytest.raises(ValueError, match="'text' is not one of .* for image queries"):
        plain.search_by_image(page_images(bundled_corpus, 1), mode="text")
    siglip = DenseConfig(str(tiny_dirs["siglip"]), str(dense_dir))
    with pytest.raises(StaleIndexError, match="another model"):
        LocalRetriever(bundled_corpus, bundled_index, embedder, dense=siglip)


def test_the_search_api_and_its_client_search_the_single_vector_index(dense_retriever, bundled_corpus):
    import httpx
    from asgi_thread import serve_app

    from vrag_rl.retrieval.api import create_app
    from vrag_rl.retrieval.client import SearchClient

    image = page_images(bundled_corpus, 3)[2]
    with serve_app(create_app(dense_retriever)) as url:
        assert httpx.get(url + "/health").json()["modes"] == ["visual", "text", "dense", "hybrid"]
        client = SearchClient(url, bundled_corpus)
        for mode in ("dense", "hybrid"):
            assert client.search(QUERIES, 4, mode) == dense_retriever.search(QUERIES, 4, mode)
            assert client.search_by_image([image], 3, mode) == dense_retriever.search_by_image([image], 3, mode)
        refused = httpx.post(url + "/search", json={"image_queries": ["x"], "image_mode": "text"})
        assert refused.status_code == 400 and "not one of ['visual', 'dense', 'hybrid'] for image" in refused.text
        client.close()


def test_the_distributed_retriever_carries_the_single_vector_index(
    ray_session, dense_retriever, bundled_corpus, bundled_index, embedder, dense_dir, tiny_dirs
):
    from vrag_rl.retrieval.actor import DistributedRetriever, RetrieverConfig

    dense = DenseConfig(str(tiny_dirs["clip"]), str(dense_dir))
    cfg = RetrieverConfig(shard_actors=2, num_cpus=0.25)
    distributed = DistributedRetriever(bundled_corpus, bundled_index, embedder, actors=cfg, dense=dense)
    for mode in ("dense", "hybrid"):
        assert distributed.search(QUERIES, top_k=6, mode=mode) == dense_retriever.search(QUERIES, top_k=6, mode=mode)


def test_the_cache_builds_the_corpus_index_once_and_again_when_the_corpus_changes(
    bundled_corpus, tiny_dirs, tmp_path, monkeypatch
):
    from vrag_rl.retrieval.corpus_index import ensure_dense_index

    monkeypatch.setenv("VRAG_RL_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    shutil.copytree(bundled_corpus, corpus)
    first = ensure_dense_index(corpus, None, str(tiny_dirs["clip"]))
    built = (tmp_path / "cache" / "dense").iterdir().__next__()
    assert first.index_dir == str(built) and SingleVectorIndex.load(built, corpus_dir=corpus).page_ids
    stamp = (built / FAISS_FILE).stat().st_mtime_ns
    assert ensure_dense_index(corpus, None, str(tiny_dirs["clip"])) == first
    assert (built / FAISS_FILE).stat().st_mtime_ns == stamp  # reused, not rebuilt
    write_pages(load_pages(corpus)[:20], corpus / "pages.parquet")
    again = ensure_dense_index(corpus, None, str(tiny_dirs["clip"]))
    assert len(SingleVectorIndex.load(again.index_dir, corpus_dir=corpus).page_ids) == 20
    assert list((tmp_path / "cache" / "dense").iterdir()) == [Path(again.index_dir)]  # the superseded one removed
    other = ensure_dense_index(corpus, None, str(tiny_dirs["siglip"]))  # another model: rebuilt for it
    assert SingleVectorIndex.load(other.index_dir).fingerprint == DenseEmbedder(other).fingerprint


@pytest.mark.slow  # `python -m vrag_rl.retrieval.api` processes
def test_the_search_api_command_serves_the_single_vector_index(
    dense_retriever, bundled_corpus, bundled_index, tiny_dirs, dense_dir, tmp_path
):
    import subprocess
    import sys

    import httpx

    from vrag_rl.vllm_server import ServerProcess, free_port

    port = free_port("127.0.0.1")
    cmd = [sys.executable, "-m", "vrag_rl.retrieval.api", "--corpus", str(bundled_corpus), "--index"]
    cmd += [str(bundled_index), "--model", str(tiny_dirs["retriever"]), "--dense-model", str(tiny_dirs["clip"])]
    half = subprocess.run([*cmd, "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert half.returncode == 2 and "--dense-model and --dense-index go together" in half.stderr
    api = ServerProcess([*cmd, "--dense-index", str(dense_dir), "--port", str(port)], f"http://127.0.0.1:{port}",
                        tmp_path / "api.log")  # fmt: skip
    try:
        answer = httpx.post(api.url + "/search", json={"queries": QUERIES, "top_k": 3, "mode": "dense"}, timeout=60)
        got = [[hit["page_id"] for hit in hits] for hits in answer.json()["results"]]
        assert got == [[h.page_id for h in hits] for hits in dense_retriever.search(QUERIES, 3, "dense")]
    finally:
        api.stop()
