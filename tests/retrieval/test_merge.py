"""Merging corpora into one page pool: unique page ids, shared pages once, gold pages following renames."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vrag_rl.data.records import QARecord, load_pages, load_qa, write_qa
from vrag_rl.retrieval.ingest import IngestConfig, ingest
from vrag_rl.retrieval.merge import main, merge_corpora
from vrag_rl.retrieval.ocr import OCR_SCHEMA, load_ocr


def make_pdf(path: Path, pages: int, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.new("RGB", (100, 140), (shade, 20 * i, 90)) for i in range(pages)]
    images[0].save(path, save_all=True, append_images=images[1:])


def make_corpus(root: Path, name: str, docs: dict[str, tuple[int, int]], gold: str) -> Path:
    src, out = root / f"{name}-pdfs", root / name
    for doc, (pages, shade) in docs.items():
        make_pdf(src / f"{doc}.pdf", pages, shade)
    assert ingest([src], out, IngestConfig(dpi=20), progress=False).ok
    write_qa([QARecord(f"{name}:1", "q", "a", [gold], (gold, 1, 2, 3, 4), "text", "", name)], out / "qa.parquet")
    rows = [{"page_id": p.page_id, "checksum": p.checksum, "text": f"text of {p.page_id} in {name}",
             "status": "ok", "error": ""} for p in load_pages(out)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=OCR_SCHEMA), out / "ocr.parquet")
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    a = make_corpus(root, "alpha", {"report": (3, 10), "shared": (2, 200)}, gold="report_2")
    b = make_corpus(root, "beta", {"report": (2, 99), "shared": (2, 200), "extra": (1, 50)}, gold="report_1")
    return a, b


def test_pool_has_unique_ids_shared_pages_once_and_gold_pages_follow_renames(corpora, tmp_path):
    a, b = corpora
    pool = tmp_path / "pool"
    report = merge_corpora([a, b], pool)
    pages = {p.page_id: p for p in load_pages(pool)}
    assert sorted(pages) == sorted(
        ["report_1", "report_2", "report_3", "shared_1", "shared_2", "report-beta_1", "report-beta_2", "extra_1"]
    )
    assert report["shared_pages"] == 2 and report["pool_pages"] == 8
    assert report["renamed_documents"] == [{"corpus": str(b), "doc": "report", "as": "report-beta"}]
    for p in pages.values():  # every file is there, with the checksum its row names
        assert Path(p.file).is_file() and Path(p.file).name.startswith(p.page_id)
    assert pages["report-beta_1"].checksum == {p.page_id: p for p in load_pages(b)}["report_1"].checksum
    qa = {r.qid: r for r in load_qa(pool)}
    assert qa["alpha:1"].gold_pages == ["report_2"]
    assert qa["beta:1"].gold_pages == ["report-beta_1"] and qa["beta:1"].answer_box[0] == "report-beta_1"
    ocr = {r.page_id: r.text for r in load_ocr(pool)}
    assert ocr["report-beta_1"] == "text of report_1 in beta" and ocr["report_1"] == "text of report_1 in alpha"
    assert set(ocr) == set(pages)


def test_repeated_question_ids_and_merging_into_a_source_are_refused(corpora, tmp_path, capsys):
    a, b = corpora
    assert main([str(a), str(a), "--out", str(tmp_path / "pool")]) == 1
    assert "question ids ['alpha:1']" in capsys.readouterr().err
    assert main([str(a), str(b), "--out", str(a)]) == 1
    assert "must be a new directory" in capsys.readouterr().err
    assert main([str(a), str(b), "--out", str(tmp_path / "ok")]) == 0
    assert "8 pages (2 shared) and 2 questions" in capsys.readouterr().out
