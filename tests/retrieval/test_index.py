"""MultiVectorIndex: exact = colpali-engine's scorer (the oracle), approximate recall, storage and staleness."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor
from PIL import Image

from vrag_rl.data.records import load_pages, load_qa, page_checksum, write_pages
from vrag_rl.retrieval.embed import PageEmbedder, model_fingerprint
from vrag_rl.retrieval.index import MultiVectorIndex, StaleIndexError
from vrag_rl.retrieval.maxsim import maxsim, pad_queries, plan_chunks
from vrag_rl.retrieval.synthetic_vectors import SyntheticCorpus, SyntheticSpec
from vrag_rl.retrieval.types import FaissKind, IndexConfig, rank

TOL = 1e-4


# ---- oracle and comparison helpers ------------------------------------------------------------------
def oracle_scores(queries: list[torch.Tensor], pages: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    """colpali-engine's score_multi_vector, each call on pages of one length.

    Its batched scorer zero-pads pages to the batch's longest, which turns a negative per-token maximum
    into 0 for shorter pages; equal-length groups have no padding, so this is MaxSim itself.
    """
    out = [{} for _ in queries]
    by_len: dict[int, list[str]] = {}
    for pid, v in pages.items():
        by_len.setdefault(len(v), []).append(pid)
    for ids in by_len.values():
        scores = BaseVisualRetrieverProcessor.score_multi_vector(queries, [pages[p] for p in ids], device="cpu")
        for q, row in enumerate(scores.tolist()):
            out[q].update(zip(ids, row))
    return out


def assert_same_ranking(results, oracle, order, k, tol=TOL):
    """Our top-k equals the oracle's ranked top-k (ties in index order), up to float noise on near-ties."""
    for res, scores in zip(results, oracle):
        expected = rank(scores, order, k)
        assert len(res) == len(expected)
        for (pid, s), (_, e) in zip(res, expected):
            assert abs(s - scores[pid]) <= tol  # every page carries its oracle score
            assert abs(s - e) <= tol  # position by position, the same score sequence
        assert res == sorted(res, key=lambda h: (-h[1], order[h[0]]))  # ties broken by index order
        boundary = expected[-1][1]
        strictly_in = {p for p, s in expected if s > boundary + tol}
        assert strictly_in <= {p for p, _ in res}
        if all(a[1] - b[1] > tol for a, b in zip(expected, expected[1:])):
            assert [p for p, _ in res] == [p for p, _ in expected]


def random_pages(n: int, seed: int, max_len: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g).tolist()
    lengths[3] = 300  # longer than a chunk: gets a chunk of its own
    pages = {
        f"p{i:04d}": torch.nn.functional.normalize(torch.randn(n_, 128, generator=g), dim=-1)
        for i, n_ in enumerate(lengths)
    }
    pages["p_dup_a"] = pages["p0007"].clone()  # exact ties: must come out in index order
    pages["p_dup_b"] = pages["p0007"].clone()
    return pages


def random_queries(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 25] + torch.randint(2, 20, (n - 2,), generator=g).tolist()
    return [torch.nn.functional.normalize(torch.randn(m, 128, generator=g), dim=-1) for m in lengths]


def create(path, pages: dict[str, torch.Tensor], **cfg) -> MultiVectorIndex:
    return MultiVectorIndex.create(path, ((p, "", v) for p, v in pages.items()), "fp-test", 128, IndexConfig(**cfg))


def subset_corpus(src: Path, dst: Path, keep: list[str]) -> Path:
    shutil.copytree(src, dst)
    write_pages(file_relative([p for p in load_pages(src) if p.page_id in keep]), dst / "pages.parquet")
    return dst


def file_relative(pages):
    return [dataclasses.replace(p, file=str(Path(p.file).relative_to(Path(p.file).parents[1]))) for p in pages]


# ---- exact ----------------------------------------------------------------------------------------
def test_plan_chunks_covers_every_page_once():
    lengths = np.array([3, 3, 3, 5, 5, 50, 1, 1, 7], dtype=np.int64)
    chunks = plan_chunks(lengths, chunk_tokens=8)
    covered = []
    for c in chunks:
        assert c.stop - c.start <= 8 or len(c.pieces) == 1  # only an oversized page exceeds a chunk
        for _offset, page, n, length in c.pieces:
            assert all(lengths[page + i] == length for i in range(n))
            covered += list(range(page, page + n))
        assert c.stop - c.start == sum(n * length for _, _, n, length in c.pieces)
    assert covered == list(range(len(lengths)))
    assert chunks[-1].stop == lengths.sum()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exact_equals_colpali_scorer_on_random_vectors(tmp_path, dtype):
    pages = random_pages(150, seed=0)
    queries = random_queries(12, seed=1)
    index = create(tmp_path / "i", pages, shard_size=37, dtype=dtype, approx="none", chunk_tokens=200)
    assert index.num_shards == 5
    stored = {p: index.page_vectors(p) for p in pages}  # float16 rounding is part of "the same embeddings"
    if dtype == "float32":
        assert all(torch.equal(stored[p], pages[p]) for p in pages)
    order = {p: i for i, p in enumerate(index.page_ids)}
    oracle = oracle_scores(queries, stored)
    for k in (1, 5, len(pages)):
        assert_same_ranking(index.search(queries, k), oracle, order, k)
    full = index.search(queries, len(pages))
    tied = [p for p, _ in full[0] if p in ("p0007", "p_dup_a", "p_dup_b")]
    assert tied == ["p0007", "p_dup_a", "p_dup_b"]


def test_a_bfloat16_scan_is_rounded_yet_search_returns_float32s_top_k(tmp_path):
    """compute_dtype=bfloat16: the scan's scores are within bf16 rounding of the float32 oracle (unit vectors:
    each similarity off by a few 2^-9, summed over the query's tokens) and really rounded; search re-scores the
    scan's ``rescore`` best in float32, so it returns the float32 search's pages, order and scores."""
    pages = random_pages(150, seed=0)
    queries = random_queries(12, seed=1)
    index = create(tmp_path / "i", pages, shard_size=37, approx="none", chunk_tokens=200, rescore=15)
    padded = pad_queries(queries, index.dim)
    rounded = False
    for shard in index.shards:
        args = (shard.vectors, shard.chunks, shard.n_pages, padded)
        fp32, bf16 = maxsim(*args), maxsim(*args, torch.bfloat16)
        bound = torch.tensor([len(q) * 2**-7 for q in queries])
        assert ((bf16 - fp32).abs() <= bound).all()
        rounded = rounded or bool(((bf16 - fp32).abs() > 1e-4).any())
    assert rounded
    for got, want in zip(index.search(queries, 10, compute_dtype="bfloat16"), index.search(queries, 10)):
        assert [p for p, _ in got] == [p for p, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)
    with pytest.raises(ValueError, match="compute_dtype must be float32 or bfloat16"):
        IndexConfig(compute_dtype="float16")


def test_exact_equals_colpali_scorer_on_tiny_colqwen2(bundled_index, bundled_corpus, embedder):
    index = MultiVectorIndex.load(bundled_index, expected_fingerprint=embedder.fingerprint, corpus_dir=bundled_corpus)
    pages = load_pages(bundled_corpus)
    assert index.page_ids == [p.page_id for p in pages] and index.num_shards == 3
    sample = [pages[i] for i in (0, 9, 23)]  # one page per shard: the index holds the embedder's vectors
    for p, emb in zip(sample, embedder.embed_images([Image.open(p.file) for p in sample])):
        torch.testing.assert_close(index.page_vectors(p.page_id), emb, atol=1e-5, rtol=0)
    vectors = {pid: index.page_vectors(pid) for pid in index.page_ids}
    order = {p: i for i, p in enumerate(index.page_ids)}
    queries = embedder.embed_queries([qa.question for qa in load_qa(bundled_corpus)[:8]])
    oracle = oracle_scores(queries, vectors)
    assert_same_ranking(index.search(queries, 24), oracle, order, 24)
    assert_same_ranking(index.search(queries, 5), oracle, order, 5)


def test_search_by_image_finds_the_page(bundled_index, bundled_corpus, embedder):
    index = MultiVectorIndex.load(bundled_index)
    pages = load_pages(bundled_corpus)[5:7]
    query = embedder.embed_images([Image.open(p.file) for p in pages])
    for p, q, hits in zip(pages, query, index.search(query, 3)):
        # Each of its tokens matches itself with similarity 1, the most any token can score.
        assert hits[0][0] == p.page_id and hits[0][1] == pytest.approx(len(q), abs=1e-3)


# ---- approximate ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    corpus = SyntheticCorpus(SyntheticSpec(n_pages=800, tokens=24, tokens_jitter=6, seed=3))
    queries, _ = corpus.queries(24, tokens=12)
    return corpus, queries, tmp_path_factory.mktemp("clustered")


def recall_at_10(index, queries, **params) -> float:
    exact = index.search(queries, 10, "exact")
    approx = index.search(queries, 10, "approx", **params)
    for a, every in zip(approx, index.search(queries, len(index.page_ids))):
        scores = dict(every)  # candidates are reranked exactly: every returned score is the exact MaxSim
        assert all(abs(s - scores[p]) <= TOL for p, s in a)
    return float(np.mean([len({p for p, _ in a} & {p for p, _ in e}) / 10 for a, e in zip(approx, exact)]))


@pytest.mark.parametrize(
    "cfg", [dict(approx="ivf"), dict(approx="ivf", ivf_codec="SQ8"), dict(approx="hnsw", hnsw_m=16, ef_construction=40)]
)
def test_approx_recall_against_exact(clustered, cfg):
    corpus, queries, root = clustered
    index = MultiVectorIndex.create(
        root / json.dumps(cfg, sort_keys=True).replace('"', ""),
        corpus.pages(),
        "fp",
        128,
        IndexConfig(shard_size=800, n_rerank=32, **cfg),
    )
    assert recall_at_10(index, queries) >= 0.95
    # The test can fail: starve candidate generation and recall drops.
    assert recall_at_10(index, queries, k_tokens=1, n_rerank=10) < 0.9


# ---- storage ---------------------------------------------------------------------------------------
def test_save_load_round_trip_and_manifest(tmp_path):
    pages = random_pages(60, seed=2)
    queries = random_queries(5, seed=3)
    built = create(tmp_path / "i", pages, shard_size=25, approx="ivf")
    loaded = MultiVectorIndex.load(tmp_path / "i", verify=True)
    for mode in ("exact", "approx"):
        assert loaded.search(queries, 7, mode) == built.search(queries, 7, mode)
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["fingerprint"] == "fp-test"
    assert [p for p, _ in manifest["pages"]] == list(pages) and manifest["corpus_checksum"]
    assert [s["n_pages"] for s in manifest["shards"]] == [25, 25, 12]  # 60 pages + 2 duplicates
    assert all(set(s["sha256"]) == {"vectors", "pages", "faiss"} for s in manifest["shards"])
    assert MultiVectorIndex.count_shards(tmp_path / "i") == 3


def test_shard_subsets_merge_to_the_full_result(tmp_path):
    pages = random_pages(90, seed=4)
    queries = random_queries(6, seed=5)
    create(tmp_path / "i", pages, shard_size=30, approx="ivf")
    full = MultiVectorIndex.load(tmp_path / "i")
    parts = [MultiVectorIndex.load(tmp_path / "i", shards=[s]) for s in range(4)]  # 92 pages: 30, 30, 30, 2
    assert parts[1].page_ids == list(pages)[30:60] and parts[1].loaded_shards == [1] and parts[1].num_shards == 4
    order = {p: i for i, p in enumerate(full.page_ids)}
    for mode in ("exact", "approx"):
        merged = [
            rank([h for part in hits for h in part], order, 8)
            for hits in zip(*(p.search(queries, 8, mode) for p in parts))
        ]
        assert merged == full.search(queries, 8, mode)
    with pytest.raises(ValueError, match="shards"):
        MultiVectorIndex.load(tmp_path / "i", shards=[4])


def test_incremental_add_equals_full_build_random(tmp_path):
    pages = random_pages(80, seed=6)
    queries = random_queries(5, seed=7)
    items = list(pages.items())
    full = create(tmp_path / "full", pages, shard_size=20, approx="ivf")
    inc = create(tmp_path / "inc", dict(items[:50]), shard_size=20, approx="ivf")
    inc.add_embeddings((p, "", v) for p, v in items[50:])
    assert inc.num_shards == 5 and inc.page_ids == list(pages)  # new shards: 20, 20, 10 | 20, 10
    reloaded = MultiVectorIndex.load(tmp_path / "inc")
    exhaustive = dict(nprobe=10_000, k_tokens=200, n_rerank=200)  # approx over differently trained shards
    for index in (inc, reloaded):
        assert index.search(queries, 10) == full.search(queries, 10)
        assert index.search(queries, 10, "approx", **exhaustive) == full.search(queries, 10)
    with pytest.raises(ValueError, match="already indexed"):
        inc.add_embeddings([(items[0][0], "", items[0][1])])


def test_incremental_add_pages_equals_full_build(bundled_corpus, embedder, tmp_path):
    ids = [p.page_id for p in load_pages(bundled_corpus)][:6]
    whole = subset_corpus(bundled_corpus, tmp_path / "whole", ids)
    part = subset_corpus(bundled_corpus, tmp_path / "part", ids[:4])
    cfg = IndexConfig(shard_size=2, dtype="float32", approx="ivf")
    full = MultiVectorIndex.build(tmp_path / "full", whole, embedder, cfg, progress=False)
    inc = MultiVectorIndex.build(tmp_path / "inc", part, embedder, cfg, progress=False)
    with pytest.raises(StaleIndexError, match="2 added") as err:
        inc.check_corpus(whole)
    assert err.value.reason == "corpus"
    inc.add_pages(whole, ids[4:][::-1], embedder, progress=False)  # taken in corpus order anyway
    inc = MultiVectorIndex.load(tmp_path / "inc", corpus_dir=whole)
    assert inc.page_ids == full.page_ids and inc.num_shards == 3
    queries = embedder.embed_queries(["revenue table", "Who founded Lagas Dynamics?"])
    for mode in ("exact", "approx"):
        assert inc.search(queries, 4, mode) == full.search(queries, 4, mode)


# ---- staleness --------------------------------------------------------------------------------------
def reason_of(excinfo) -> str:
    return excinfo.value.reason


def test_changed_corpus_is_stale(bundled_index, bundled_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(bundled_corpus, corpus)
    pages = file_relative(load_pages(corpus))
    changed = pages[2]
    Image.new("RGB", (changed.width, changed.height), "white").save(corpus / changed.file)
    pages[2] = dataclasses.replace(
        changed, checksum=page_checksum(dataclasses.replace(changed, file=str(corpus / changed.file), checksum=""))
    )
    write_pages(pages[:-1], corpus / "pages.parquet")  # and the last page removed
    with pytest.raises(StaleIndexError, match=r"1 removed \(e\.g\. doc.*1 changed \(e\.g\. " + changed.page_id) as err:
        MultiVectorIndex.load(bundled_index, corpus_dir=corpus)
    assert reason_of(err) == "corpus"


def test_wrong_fingerprint_fails(bundled_index, embedder):
    with pytest.raises(StaleIndexError, match="fingerprint") as err:
        MultiVectorIndex.load(bundled_index, expected_fingerprint="0" * 64)
    assert reason_of(err) == "fingerprint"
    MultiVectorIndex.load(bundled_index, expected_fingerprint=embedder.fingerprint)

    class OtherModel:
        fingerprint = "1" * 64

    index = MultiVectorIndex.load(bundled_index)
    with pytest.raises(StaleIndexError, match="fingerprint"):
        index.add_pages("unused", [], OtherModel())


def test_damaged_files_fail_with_the_shard_named(bundled_index, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(bundled_index, index_dir)
    vectors = index_dir / "shard_00001.vectors.npy"
    data = bytearray(vectors.read_bytes())
    data[-5] ^= 0xFF
    vectors.write_bytes(bytes(data))
    with pytest.raises(StaleIndexError, match="shard 1: file .*shard_00001.vectors.npy does not match") as err:
        MultiVectorIndex.load(index_dir)
    assert reason_of(err) == "checksum"
    assert MultiVectorIndex.load(index_dir, shards=[0, 2]).loaded_shards == [0, 2]  # other shards still serve
    (index_dir / "shard_00002.faiss").unlink()
    with pytest.raises(StaleIndexError, match="shard 2: file .*missing"):
        MultiVectorIndex.load(index_dir, shards=[2])


@pytest.mark.parametrize("edit", ["version", "pages", "missing"])
def test_bad_manifest_fails(bundled_index, tmp_path, edit):
    index_dir = tmp_path / "index"
    shutil.copytree(bundled_index, index_dir)
    path = index_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    if edit == "version":
        manifest["format_version"] = 99
    elif edit == "pages":
        manifest["pages"][0][0] = "doc9999_1"
    path.write_text(json.dumps(manifest))
    if edit == "missing":
        path.unlink()
    expected = {
        "version": ("version", "version 99"),
        "pages": ("checksum", "page list"),
        "missing": ("missing", "no index"),
    }
    with pytest.raises(StaleIndexError, match=expected[edit][1]) as err:
        MultiVectorIndex.load(index_dir)
    assert reason_of(err) == expected[edit][0]


# ---- pooling, validation, CLI -----------------------------------------------------------------------
def test_pooled_index_has_fewer_vectors_and_matches_oracle(bundled_corpus, embedder_cfg, tmp_path):
    ids = [p.page_id for p in load_pages(bundled_corpus)][:4]
    corpus = subset_corpus(bundled_corpus, tmp_path / "c", ids)
    pooled = PageEmbedder(dataclasses.replace(embedder_cfg, pool_factor=4))
    index = MultiVectorIndex.build(
        tmp_path / "i", corpus, pooled, IndexConfig(dtype="float32", approx="hnsw"), progress=False
    )
    n_tokens = index.manifest["shards"][0]["n_tokens"]
    full_tokens = 4 * int(
        pooled.processor.process_images([Image.open(load_pages(corpus)[0].file)])["attention_mask"].sum()
    )
    assert 4 <= n_tokens <= full_tokens // 4
    vectors = {p: index.page_vectors(p) for p in ids}
    queries = pooled.embed_queries(["revenue table", "founded"])
    order = {p: i for i, p in enumerate(ids)}
    assert_same_ranking(index.search(queries, 4), oracle_scores(queries, vectors), order, 4)
    assert [len(h) for h in index.search(queries, 2, "approx")] == [2, 2]
    with pytest.raises(StaleIndexError, match="fingerprint"):
        MultiVectorIndex.load(tmp_path / "i", expected_fingerprint=model_fingerprint(embedder_cfg.model_dir, 1))


def test_search_validation(tmp_path):
    index = create(tmp_path / "i", random_pages(10, seed=8), approx="none")
    good = random_queries(2, seed=9)
    with pytest.raises(ValueError, match="mode"):
        index.search(good, 3, "fuzzy")
    with pytest.raises(ValueError, match="top_k"):
        index.search(good, 0)
    with pytest.raises(ValueError, match=r"query 1: expected a \(n_tokens >= 1, 128\)"):
        index.search([good[0], torch.zeros(3, 64)], 3)
    with pytest.raises(ValueError, match="NaN"):
        index.search([torch.full((2, 128), float("nan"))], 3)
    with pytest.raises(ValueError, match="approx='none'"):
        index.search(good, 3, "approx")
    with pytest.raises(FileExistsError):
        create(tmp_path / "i", random_pages(10, seed=8))


def test_each_index_takes_only_its_own_faiss_kinds():
    from vrag_rl.retrieval.dense_index import DenseIndexConfig

    assert IndexConfig(approx="none").approx is FaissKind.NONE
    assert DenseIndexConfig(kind="exact").kind is FaissKind.EXACT
    with pytest.raises(ValueError, match=r"approx must be one of \['ivf', 'hnsw', 'none'\], got 'exact'"):
        IndexConfig(approx="exact")
    with pytest.raises(ValueError, match=r"kind must be one of \['exact', 'ivf', 'hnsw'\], got 'none'"):
        DenseIndexConfig(kind="none")


def test_cli_build_and_add(bundled_corpus, tiny_dirs, tmp_path, capsys):
    from vrag_rl.retrieval.index import main

    ids = [p.page_id for p in load_pages(bundled_corpus)]
    corpus = subset_corpus(bundled_corpus, tmp_path / "c", ids[:3])
    model = str(tiny_dirs["retriever"])
    main(["build", "--corpus", str(corpus), "--model", model, "--out", str(tmp_path / "i"), "--shard-size", "2"])
    assert MultiVectorIndex.load(tmp_path / "i").num_shards == 2
    main(
        [
            "build",
            "--corpus",
            str(corpus),
            "--model",
            model,
            "--out",
            str(tmp_path / "b"),
            "--compute-dtype",
            "bfloat16",
        ]
    )
    assert MultiVectorIndex.load(tmp_path / "b").cfg.compute_dtype == "bfloat16"  # every search's default
    pages = load_pages(bundled_corpus)[:4]
    write_pages(file_relative(pages), corpus / "pages.parquet")  # a fourth page arrives
    main(["add", "--index", str(tmp_path / "i"), "--corpus", str(corpus), "--model", model])
    index = MultiVectorIndex.load(tmp_path / "i", corpus_dir=corpus)
    assert index.page_ids == ids[:4] and index.num_shards == 3
    assert "added 1 pages" in capsys.readouterr().out


def test_concurrent_writes_of_one_file_never_share_a_temporary_file(tmp_path):
    """Two threads saving the same shard file over and over: each write has its own temporary name, so every
    save completes and the file always holds one whole array."""
    import threading

    from vrag_rl.retrieval.store import save_npy

    path, errors = tmp_path / "shard.npy", []

    def save(value: float) -> None:
        try:
            for _ in range(200):
                save_npy(path, np.full((64, 128), value, dtype=np.float32))
        except Exception as err:  # noqa: BLE001 (collected for the assertion)
            errors.append(err)

    threads = [threading.Thread(target=save, args=(v,)) for v in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert np.unique(np.load(path)).tolist() in ([1.0], [2.0])
    assert list(tmp_path.glob(".*.tmp")) == []
