"""OCR with the real tesseract binary, its resumable parquet output, and the text-RAG baseline.

The whole bundled corpus is OCR'd once into the test cache (about 30 s on 2 cores) and reused by
later sessions through ``ocr_corpus``'s own resume logic (image checksums), so a changed bundled
page is OCR'd again. Other tests OCR two pages for real and fake the engine where only the
bookkeeping is under test.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import unicodedata
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from vrag_rl.data.records import load_pages, load_qa, write_pages
from vrag_rl.retrieval import ocr
from vrag_rl.retrieval.bm25 import BM25Index
from vrag_rl.retrieval.ingest import STATE_KEY
from vrag_rl.retrieval.ocr import OcrConfig, OcrError, load_ocr, main, ocr_corpus

CACHE = Path(os.environ.get("VRAG_RL_CACHE", Path(__file__).resolve().parents[2] / ".cache"))


@pytest.fixture(scope="module", autouse=True)
def require_tesseract():
    if shutil.which("tesseract") is None:
        pytest.fail("tesseract is not installed: run `make assets` (Debian's tesseract-ocr, tesseract-ocr-eng)")


@pytest.fixture(scope="module")
def bundled_ocr(bundled_corpus) -> Path:
    """A corpus directory sharing the bundled page images, with ocr.parquet for every page."""
    d = CACHE / "ocr" / "synthetic-small"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundled_corpus / "pages.parquet", d / "pages.parquet")
    link = d / "pages"
    if not link.is_symlink():
        link.symlink_to((bundled_corpus / "pages").resolve(), target_is_directory=True)
    ocr_corpus(d, progress=False, workers=2)
    return d


def entity_of_page(corpus) -> dict[str, str]:
    return {g: q.entity for q in load_qa(corpus) for g in q.gold_pages}


def make_corpus(dst: Path, src: Path, page_ids: list[str]) -> list:
    """A corpus of some bundled pages (copied), in the given order."""
    (dst / "pages").mkdir(parents=True)
    by_id = {p.page_id: p for p in load_pages(src)}
    pages = []
    for pid in page_ids:
        shutil.copyfile(by_id[pid].file, dst / "pages" / f"{pid}.jpg")
        pages.append(dataclasses.replace(by_id[pid], file=f"pages/{pid}.jpg"))
    write_pages(pages, dst / "pages.parquet")
    return pages


def add_broken_pages(corpus: Path, pages: list) -> list:
    """A corrupt JPEG and a zero-byte file, listed in the manifest like real pages."""
    (corpus / "pages" / "bad_1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (corpus / "pages" / "empty_1.jpg").write_bytes(b"")
    extra = [
        dataclasses.replace(pages[0], page_id=f"{doc}_1", doc=doc, page=1, file=f"pages/{doc}_1.jpg")
        for doc in ("bad", "empty")
    ]
    write_pages(pages + extra, corpus / "pages.parquet")
    return pages + extra


def test_bundled_pages_ocr_finds_entity_names(bundled_ocr, bundled_corpus):
    recs = load_ocr(bundled_ocr)
    pages = load_pages(bundled_corpus)
    assert [r.page_id for r in recs] == [p.page_id for p in pages]  # one row per page, corpus order
    assert all(r.status == "ok" and r.error == "" for r in recs)
    for r, p in zip(recs, pages):
        assert r.checksum == hashlib.sha256(Path(p.file).read_bytes()).hexdigest()
    entity = entity_of_page(bundled_corpus)
    found = [r.page_id for r in recs if entity[r.page_id].lower() in r.text.lower()]
    assert len(found) >= 0.9 * len(recs), sorted(set(entity) - set(found))


def test_text_rag_baseline_bm25_over_ocr(bundled_ocr, bundled_corpus):
    """BM25 over OCR text finds the right document for nearly every question, and mostly the gold page."""
    recs = load_ocr(bundled_ocr)
    index = BM25Index().build([r.page_id for r in recs], [r.text for r in recs])
    qa = load_qa(bundled_corpus)

    def doc(page_id: str) -> str:
        return page_id.rsplit("_", 1)[0]

    by_question = index.search([q.question for q in qa], top_k=5)
    top_doc = sum(bool(h) and doc(h[0][0]) == doc(q.gold_pages[0]) for h, q in zip(by_question, qa))
    top_page = sum(bool(h) and h[0][0] in q.gold_pages for h, q in zip(by_question, qa))
    assert top_doc >= 0.9 * len(qa) and top_page >= 0.8 * len(qa), (top_doc, top_page, len(qa))
    by_entity = index.search([q.entity for q in qa], top_k=5)
    assert sum(bool(h) and doc(h[0][0]) == doc(q.gold_pages[0]) for h, q in zip(by_entity, qa)) >= 0.9 * len(qa)


def test_cli_real_ocr_bad_pages_and_resume(tmp_path, bundled_corpus, monkeypatch, capsys):
    corpus = tmp_path / "c"
    pages = add_broken_pages(corpus, make_corpus(corpus, bundled_corpus, ["doc0000_1", "doc0001_2"]))
    assert main([str(corpus), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 pages ok, 2 failed" in out and "bad_1: error" in out and "empty_1: error" in out
    recs = {r.page_id: r for r in load_ocr(corpus)}
    assert list(recs) == [p.page_id for p in pages]
    entity = entity_of_page(bundled_corpus)
    for pid in ("doc0000_1", "doc0001_2"):
        assert recs[pid].status == "ok" and entity[pid].lower() in recs[pid].text.lower()
    for pid in ("bad_1", "empty_1"):
        assert recs[pid].status == "error" and recs[pid].text == "" and recs[pid].error

    # Second run: finished pages are skipped, failed ones are tried again.
    calls = []
    monkeypatch.setattr(ocr, "ocr_image_bytes", lambda data, cfg, exe=None: calls.append(data) or "fake text")
    ocr_corpus(corpus, progress=False)
    assert len(calls) == 2 and {r.page_id: r.text for r in load_ocr(corpus)}["doc0000_1"] == recs["doc0000_1"].text

    # A page image replaced under the same id is OCR'd again; pages dropped from the manifest lose their row.
    shutil.copyfile(bundled_corpus / "pages" / "doc0002_1.jpg", corpus / "pages" / "doc0001_2.jpg")
    write_pages(pages[:2], corpus / "pages.parquet")
    calls.clear()
    ocr_corpus(corpus, progress=False)
    assert len(calls) == 1 and calls[0] == (corpus / "pages" / "doc0001_2.jpg").read_bytes()
    assert [(r.page_id, r.text) for r in load_ocr(corpus)] == [
        ("doc0000_1", recs["doc0000_1"].text),
        ("doc0001_2", "fake text"),
    ]
    assert sorted(p.name for p in corpus.iterdir()) == [
        ".writer.lock",
        "ocr.parquet",
        "pages",
        "pages.parquet",
    ]  # no temp


def test_timeout_is_recorded_not_fatal(tmp_path, bundled_corpus):
    make_corpus(tmp_path, bundled_corpus, ["doc0000_2"])
    ocr_corpus(tmp_path, progress=False, cfg=OcrConfig(timeout=0.01))
    (rec,) = load_ocr(tmp_path)
    assert (rec.page_id, rec.status, rec.text) == ("doc0000_2", "timeout", "")


def test_interrupted_run_keeps_finished_pages(tmp_path, bundled_corpus, monkeypatch):
    ids = [p.page_id for p in load_pages(bundled_corpus)[:8]]
    make_corpus(tmp_path, bundled_corpus, ids)
    calls = []

    def fake(data, cfg, exe=None):
        calls.append(data)
        if len(calls) == 3:  # Ctrl-C while the third page is being read
            os.kill(os.getpid(), signal.SIGINT)
        return f"page text {len(calls)}"

    monkeypatch.setattr(ocr, "ocr_image_bytes", fake)
    # A shell starting the suite in the background without job control leaves SIGINT ignored; Ctrl-C is meant.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            ocr_corpus(tmp_path, progress=False, workers=1, flush_every=100)
    finally:
        signal.signal(signal.SIGINT, previous)
    done = load_ocr(tmp_path)  # written on the way out, complete and readable
    assert 2 <= len(done) < len(ids) and all(r.status == "ok" for r in done)
    assert [r.page_id for r in done] == [i for i in ids if i in {r.page_id for r in done}]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    n_before = len(calls)
    ocr_corpus(tmp_path, progress=False, workers=2)
    assert len(calls) - n_before == len(ids) - len(done)
    assert [r.page_id for r in load_ocr(tmp_path)] == ids


def test_missing_binary_or_language_fails_clearly(tmp_path, bundled_corpus):
    make_corpus(tmp_path, bundled_corpus, ["doc0000_1"])
    with pytest.raises(OcrError, match="not found"):
        ocr_corpus(tmp_path, cfg=OcrConfig(tesseract_cmd=str(tmp_path / "no-tesseract")))
    with pytest.raises(OcrError, match="language pack"):
        ocr_corpus(tmp_path, lang="xx_nonexistent")
    assert not (tmp_path / "ocr.parquet").exists()
    with pytest.raises(FileNotFoundError, match="run `python -m vrag_rl.retrieval.ocr"):
        load_ocr(tmp_path)


def test_module_entry_point(tmp_path):
    cmd = [sys.executable, "-m", "vrag_rl.retrieval.ocr", str(tmp_path / "missing")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "error:" in r.stderr


# ---- the PDF's own text layer ---------------------------------------------------------------------------------

GNUPLOT = Path(__file__).resolve().parents[2] / ".cache" / "assets" / "pdf" / "gnuplot.pdf"
SCANNED = "Scanned invoice number 4711"


def words(text: str) -> list[str]:
    return re.findall(r"\w+", unicodedata.normalize("NFC", text.lower()))


def poppler_text(pdf: Path, page: int) -> str:
    """poppler's pdftotext for one page: the oracle for the text layer."""
    cmd = ["pdftotext", "-f", str(page), "-l", str(page), str(pdf), "-"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def manual(tmp_path_factory) -> Path:
    """Five pages of gnuplot's manual (born digital) and a scanned page (an image-only PDF), ingested."""
    from PIL import Image, ImageDraw, ImageFont

    from vrag_rl.retrieval.ingest import IngestConfig, ingest

    if not GNUPLOT.is_file():
        pytest.fail(f"{GNUPLOT} is missing: run `make assets` (it extracts gnuplot.pdf from Debian's gnuplot-doc)")
    src = tmp_path_factory.mktemp("manual-src")
    shutil.copyfile(GNUPLOT, src / "gnuplot.pdf")
    scan = Image.new("RGB", (850, 1100), "white")
    ImageDraw.Draw(scan).text((60, 120), SCANNED, fill="black", font=ImageFont.load_default(size=44))
    scan.save(src / "scan.pdf")
    out = tmp_path_factory.mktemp("manual")
    assert ingest([src], out, IngestConfig(dpi=100, max_pages=5), progress=False).ok
    return out


def copy_corpus(corpus: Path, dst: Path) -> Path:
    shutil.copytree(corpus, dst, ignore=shutil.ignore_patterns(".writer.lock", "ocr.parquet"))
    return dst


def test_the_pdf_source_reads_the_text_layer_as_poppler_does(manual, tmp_path):
    corpus = copy_corpus(manual, tmp_path / "c")
    ocr_corpus(corpus, progress=False, source="pdf")
    rows = {r.page_id: r for r in load_ocr(corpus)}
    for page in load_pages(corpus):
        row = rows[page.page_id]
        assert (row.status, row.source) == ("ok", "pdf")
        if page.doc == "scan":
            assert row.text == ""  # an image-only page has no text layer
            continue
        ours, oracle = set(words(row.text)), set(words(poppler_text(GNUPLOT, page.page)))
        assert oracle and len(ours & oracle) / len(ours | oracle) > 0.95, (page.page_id, ours ^ oracle)


def test_auto_reads_the_layer_where_there_is_one_and_tesseract_where_not(manual, tmp_path, monkeypatch):
    corpus = copy_corpus(manual, tmp_path / "c")
    ocr_corpus(corpus, progress=False, source="auto")
    rows = {r.page_id: r for r in load_ocr(corpus)}
    assert {pid: r.source for pid, r in rows.items()} == {
        **{f"gnuplot_{k}": "pdf" for k in range(1, 6)},
        "scan_1": "ocr",
    }
    assert words(SCANNED) == words(rows["scan_1"].text)[: len(words(SCANNED))]
    # the same corpus again under auto: every row stands; under ocr: the layer's rows are read again by tesseract
    calls = []
    monkeypatch.setattr(ocr, "ocr_image_bytes", lambda data, cfg, exe=None: calls.append(data) or "fake text")
    ocr_corpus(corpus, progress=False, source="auto")
    assert calls == []
    ocr_corpus(corpus, progress=False, source="ocr")
    assert len(calls) == 5 and {r.source for r in load_ocr(corpus)} == {"ocr"}


@pytest.mark.slow  # tesseract over five pages of the manual
def test_text_search_over_the_layer_finds_pages_at_least_as_well_as_over_ocr(manual, tmp_path):
    """Queries are each page's rarest words by poppler (neither source's own text): recall@1 of BM25 per source."""
    pages = [p for p in load_pages(manual) if p.doc == "gnuplot"]
    texts = {p.page_id: words(poppler_text(GNUPLOT, p.page)) for p in pages}
    counts = {w: sum(w in set(t) for t in texts.values()) for t in texts.values() for w in t}
    queries = {pid: " ".join(sorted(set(t), key=lambda w: (counts[w], w))[:4]) for pid, t in texts.items()}
    recall = {}
    for source in ("pdf", "ocr"):
        corpus = copy_corpus(manual, tmp_path / source)
        ocr_corpus(corpus, progress=False, source=source)
        rows = [r for r in load_ocr(corpus) if r.page_id in texts]
        index = BM25Index()
        index.build([r.page_id for r in rows], [r.text for r in rows])
        hits = index.search(list(queries.values()), top_k=1)
        recall[source] = sum(h[0][0] == pid for pid, h in zip(queries, hits)) / len(queries)
    assert recall["pdf"] == 1.0 and recall["pdf"] >= recall["ocr"], recall


@pytest.mark.slow  # tesseract over five pages of the manual
@pytest.mark.parametrize("how", ["changed", "gone"])
def test_a_source_pdf_changed_or_gone_since_ingest_is_not_read(manual, tmp_path, how):
    corpus = copy_corpus(manual, tmp_path / "c")
    pages = load_pages(corpus)
    old = next(p.source for p in pages if p.doc == "gnuplot")
    new = tmp_path / "gnuplot.pdf"
    if how == "changed":
        new.write_bytes(GNUPLOT.read_bytes() + b"\n% edited after ingest\n")
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(corpus / "pages.parquet").metadata.items()}
    state = json.loads(meta[STATE_KEY])
    state["sources"][str(new)] = state["sources"].pop(old)  # the manifest now names the new file, as ingested
    moved = [dataclasses.replace(p, source=str(new)) if p.source == old else p for p in pages]
    write_pages(moved, corpus / "pages.parquet", {STATE_KEY: json.dumps(state)})
    ocr_corpus(corpus, progress=False, source="pdf")
    rows = [r for r in load_ocr(corpus) if r.page_id.startswith("gnuplot")]
    assert rows and all(r.status == "error" and "is gone or changed since ingest" in r.error for r in rows)
    ocr_corpus(corpus, progress=False, source="auto")  # auto reads those pages' images instead
    assert {r.source for r in load_ocr(corpus) if r.page_id.startswith("gnuplot")} == {"ocr"}


def test_a_file_from_before_the_source_column_reads_as_tesseract(tmp_path):
    import pyarrow as pa

    rows = [{"page_id": "a_1", "checksum": "x", "text": "t", "status": "ok", "error": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ocr.parquet")
    assert [r.source for r in load_ocr(tmp_path)] == ["ocr"]
