"""The in-process LocalRetriever: visual / text / hybrid / image search against independent oracles, safe page paths."""

import copy
import dataclasses
import os
import shutil
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vrag_rl.data.records import load_pages, load_qa, write_pages
from vrag_rl.retrieval.base import PageCatalog
from vrag_rl.retrieval.bm25 import BM25Index
from vrag_rl.retrieval.index import StaleIndexError
from vrag_rl.retrieval.local import LocalRetriever
from vrag_rl.retrieval.ocr import OCR_FILE
from vrag_rl.retrieval.types import IndexMode, SearchSettings, rank

QUERIES = ["annual revenue table", "Lagas Dynamics research centre", "bar chart of sales", "who founded it"]


def write_ocr(corpus: Path, texts: dict[str, str]) -> None:
    from vrag_rl.data.records import page_checksum
    from vrag_rl.retrieval.ocr import OCR_SCHEMA

    read = {p.page_id: page_checksum(p) for p in load_pages(corpus)}
    rows = [
        {"page_id": pid, "checksum": read.get(pid, "?"), "text": t, "status": "ok", "error": ""}
        for pid, t in texts.items()
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=OCR_SCHEMA), corpus / OCR_FILE)


@pytest.fixture(scope="module")
def corpus_copy(bundled_corpus, tmp_path_factory) -> Path:
    """The bundled corpus plus an ocr.parquet whose page texts are known: "word{i} shared ..." for page i."""
    out = tmp_path_factory.mktemp("corpus") / "c"
    shutil.copytree(bundled_corpus, out)
    ids = [p.page_id for p in load_pages(out)]
    write_ocr(out, {pid: f"word{i} shared {'even' if i % 2 == 0 else 'odd'} {pid}" for i, pid in enumerate(ids)})
    return out


@pytest.fixture(scope="module")
def retriever(corpus_copy, visual_index, embedder) -> LocalRetriever:
    return LocalRetriever(corpus_copy, visual_index, embedder, settings=SearchSettings(fusion_depth=10))


@pytest.fixture(scope="module")
def oracle_scores(retriever, bundled_corpus):
    """colpali-engine's own MaxSim over the page vectors the index stores: the oracle for visual search."""
    from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor

    ids = [p.page_id for p in load_pages(bundled_corpus)]
    page_emb = [retriever.index.page_vectors(pid) for pid in ids]

    def scores(query_emb: list[torch.Tensor]) -> list[dict[str, float]]:
        s = BaseVisualRetrieverProcessor.score_multi_vector(query_emb, page_emb, device="cpu")
        return [dict(zip(ids, row.tolist())) for row in s]

    return scores


def index_order(retriever) -> dict[str, int]:
    return {pid: i for i, pid in enumerate(retriever.index.all_page_ids)}


def assert_matches(hits, oracle: dict[str, float], order: dict[str, int], top_k: int, tol: float = 1e-4):
    """Same scores rank by rank; a different page at a rank is allowed only inside a (near-)tie."""
    want = rank(oracle, order, top_k)
    assert len(hits) == len(want)
    for h, (_, s) in zip(hits, want):
        assert h.score == pytest.approx(s, abs=tol)
        assert oracle[h.page_id] == pytest.approx(s, abs=tol)
    assert len({h.page_id for h in hits}) == len(hits)


def test_visual_search_equals_colpali_oracle(retriever, oracle_scores):
    hits = retriever.search(QUERIES, top_k=7, mode="visual")
    oracle = oracle_scores(retriever.embedder.embed_queries(QUERIES))
    assert len(hits) == len(QUERIES)
    for h, o in zip(hits, oracle):
        assert_matches(h, o, index_order(retriever), 7)
        for hit in h:
            assert Path(hit.image_path).is_absolute() and Path(hit.image_path).name == f"{hit.page_id}.jpg"


def test_search_is_deterministic(retriever):
    assert retriever.search(QUERIES, 5) == retriever.search(QUERIES, 5)
    assert retriever.search(QUERIES[:1], 24)[0][:5] == retriever.search(QUERIES[:1], 5)[0]


def test_search_by_image_finds_the_page_itself(retriever, oracle_scores, bundled_corpus):
    pages = load_pages(bundled_corpus)
    picks = [pages[3], pages[17]]
    images = [Image.open(p.file).convert("RGB") for p in picks]
    hits = retriever.search_by_image(images, top_k=4)
    oracle = oracle_scores(retriever.embedder.embed_images(images))
    for p, h, o in zip(picks, hits, oracle):
        assert_matches(h, o, index_order(retriever), 4)
        assert h[0].page_id == p.page_id  # normalised vectors: each token matches itself best


def test_text_search_reads_ocr_parquet(retriever):
    ids = retriever.page_ids
    hits = retriever.search(["word5", "WORD11 shared", "nothing-matches-this"], top_k=3, mode="text")
    assert [h.page_id for h in hits[0]] == [ids[5]]
    assert hits[1][0].page_id == ids[11] and len(hits[1]) == 3
    assert [h.page_id for h in hits[1][1:]] == ids[:2]  # equal "shared" scores: corpus order
    assert hits[2] == []


def test_hybrid_is_rrf_of_visual_and_text(retriever):
    queries = ["word3 even", "odd chart"]
    depth = retriever.settings.fusion_depth
    visual = retriever.search(queries, depth, "visual")
    text = retriever.search(queries, depth, "text")
    hybrid = retriever.search(queries, 6, "hybrid")
    for v, t, h in zip(visual, text, hybrid):
        # Independent RRF: exact fractions, k=60, ranks 1-based.
        fused: dict[str, Fraction] = {}
        for ranking in ([x.page_id for x in v], [x.page_id for x in t]):
            for r, pid in enumerate(ranking, 1):
                fused[pid] = fused.get(pid, Fraction(0)) + Fraction(1, 60 + r)
        best = sorted(fused.values(), reverse=True)[:6]
        assert [x.score for x in h] == pytest.approx([float(b) for b in best], abs=1e-12)
        for x in h:
            assert float(fused[x.page_id]) == pytest.approx(x.score, abs=1e-12)


def test_search_argument_errors(retriever):
    with pytest.raises(ValueError, match="mode"):
        retriever.search(["x"], 3, mode="bm25")
    with pytest.raises(ValueError, match="top_k"):
        retriever.search(["x"], 0)
    with pytest.raises(TypeError):
        retriever.search("one string", 3)
    assert retriever.search([], 3) == []


def test_search_settings_are_checked_when_made():
    assert SearchSettings(index_mode="approx").index_mode is IndexMode.APPROX
    for bad, what in (
        (dict(index_mode="fuzzy"), "index_mode"),
        (dict(fusion_depth=0), "fusion_depth"),
        (dict(rrf_k=-1), "rrf_k"),
    ):
        with pytest.raises(ValueError, match=what):
            SearchSettings(**bad)


def test_text_modes_need_a_text_index(bundled_corpus, visual_index, embedder, tmp_path):
    # The bundled pages without the corpus's ocr.parquet.
    shutil.copyfile(bundled_corpus / "pages.parquet", tmp_path / "pages.parquet")
    (tmp_path / "pages").symlink_to((bundled_corpus / "pages").resolve(), target_is_directory=True)
    r = LocalRetriever(tmp_path, visual_index, embedder)
    assert r.text_index is None
    with pytest.raises(ValueError, match="text index"):
        r.search(["x"], 3, mode="hybrid")
    assert len(r.search(["x"], 3)[0]) == 3


def test_bundled_corpus_has_a_text_layer(bundled_corpus, visual_index, embedder):
    r = LocalRetriever(bundled_corpus, visual_index, embedder)
    record = load_qa(bundled_corpus)[0]
    assert r.search([f"{record.entity} {record.category}"], 3, mode="text")[0][0].page_id in set(
        p for q in load_qa(bundled_corpus) if q.entity == record.entity for p in q.gold_pages
    )


def test_stale_ocr_is_refused_with_the_pages_named(corpus_copy, visual_index, embedder, tmp_path):
    ids = [p.page_id for p in load_pages(corpus_copy)]
    stale = tmp_path / "stale"
    shutil.copytree(corpus_copy, stale)
    texts = {pid: "text" for pid in ids[1:]} | {"gone_9": "a page no longer in the manifest"}
    write_ocr(stale, texts)  # no row for the first page, one for a page that is not there
    with pytest.raises(ValueError, match=f"1 missing \\(e.g. {ids[0]}\\); 1 unknown \\(e.g. gone_9\\)"):
        LocalRetriever(stale, visual_index, embedder)
    rows = pq.read_table(stale / OCR_FILE).to_pylist()
    rows = [{**r, "checksum": "0" * 64} if r["page_id"] == ids[3] else r for r in rows if r["page_id"] in ids]
    rows.insert(0, {"page_id": ids[0], "checksum": rows[0]["checksum"], "text": "", "status": "ok", "error": ""})
    pq.write_table(pa.Table.from_pylist(rows), stale / OCR_FILE)
    with pytest.raises(ValueError, match=f"does not match the page manifest: 2 changed \\(e.g. {ids[0]}, {ids[3]}\\)"):
        LocalRetriever(stale, visual_index, embedder)


def test_explicit_and_saved_text_index(visual_index, embedder, tmp_path, bundled_corpus):
    ids = [p.page_id for p in load_pages(bundled_corpus)]
    bm25 = BM25Index().build(ids, [f"alpha{i}" for i in range(len(ids))])
    saved = bm25.save(tmp_path / "bm25.npz")
    for text_index in (bm25, saved):
        r = LocalRetriever(bundled_corpus, visual_index, embedder, text_index=text_index)
        assert r.search(["alpha7"], 2, "text")[0][0].page_id == ids[7]
    foreign = BM25Index().build(["nope_1"], ["alpha"])
    with pytest.raises(ValueError, match="not in the corpus"):
        LocalRetriever(bundled_corpus, visual_index, embedder, text_index=foreign)


def test_index_from_another_corpus_or_model_fails(corpus_copy, visual_index, embedder, tmp_path):
    smaller = tmp_path / "smaller"
    shutil.copytree(corpus_copy, smaller)
    pages = load_pages(smaller)
    rel = [dataclasses.replace(p, file=str(Path(p.file).relative_to(smaller))) for p in pages]
    write_pages(rel[:-2], smaller / "pages.parquet")
    (smaller / OCR_FILE).unlink()
    with pytest.raises(StaleIndexError, match="stale"):
        LocalRetriever(smaller, visual_index, embedder)
    other = copy.copy(embedder)  # the same weights with another pooling: another fingerprint, no model load
    other.cfg = dataclasses.replace(embedder.cfg, pool_factor=2)
    other.__dict__.pop("fingerprint", None)
    with pytest.raises(StaleIndexError, match="fingerprint"):
        LocalRetriever(corpus_copy, visual_index, other)


def test_page_path_resolves_only_manifest_pages_inside_the_corpus(corpus_copy, tmp_path):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"secret")
    corpus = tmp_path / "c"
    shutil.copytree(corpus_copy, corpus)
    pages = load_pages(corpus)
    rel = [dataclasses.replace(p, file=str(Path(p.file).relative_to(corpus))) for p in pages]
    os.symlink(outside, corpus / "pages" / "evil_1.jpg")
    os.symlink(corpus / "pages" / "doc0000_1.jpg", corpus / "pages" / "alias_1.jpg")  # inside: fine
    extra = [
        dataclasses.replace(rel[0], page_id="evil_1", doc="evil", file="pages/evil_1.jpg"),
        dataclasses.replace(rel[0], page_id="evil_2", doc="evil", page=2, file="../outside.jpg"),
        dataclasses.replace(rel[0], page_id="evil_3", doc="evil", page=3, file=str(outside)),
        dataclasses.replace(rel[0], page_id="alias_1", doc="alias", file="pages/alias_1.jpg"),
        dataclasses.replace(rel[0], page_id="gone_1", doc="gone", file="pages/gone_1.jpg"),
    ]
    write_pages(rel + extra, corpus / "pages.parquet")
    with pytest.raises(ValueError, match="2 rows name files outside the corpus: 'evil_2'.*'evil_3'"):
        PageCatalog(corpus)  # a manifest naming paths out of its corpus is refused whole
    write_pages(rel + [e for e in extra if e.page_id not in ("evil_2", "evil_3")], corpus / "pages.parquet")
    cat = PageCatalog(corpus)

    p = cat.page_path("doc0000_2")
    assert p == (corpus / "pages" / "doc0000_2.jpg").resolve() and p.read_bytes()[:2] == b"\xff\xd8"
    assert cat.page_path("alias_1") == (corpus / "pages" / "doc0000_1.jpg").resolve()
    for bad in [
        "../pages.parquet",
        "/etc/passwd",
        "doc0000_1/../../outside",
        "",
        "doc0000_1.jpg",
        "pages/doc0000_1.jpg",
        "..",
        "doc0000_1\x00",
        str(corpus / "pages" / "doc0000_1.jpg"),
        3,
        None,
    ]:
        with pytest.raises(KeyError):
            cat.page_path(bad)
    with pytest.raises(ValueError, match="outside the corpus"):
        cat.page_path("evil_1")
    with pytest.raises(FileNotFoundError):
        cat.page_path("gone_1")


def test_catalog_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pages.parquet"):
        PageCatalog(tmp_path)
