"""Converters of the public annotation formats, on small files written by hand after the published schemas,
against a corpus ingested from PDFs made here (so gold pages resolve through ingest's names)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from vrag_rl.data.convert import PAPER_COLUMNS, convert, main
from vrag_rl.data.records import load_qa
from vrag_rl.retrieval.ingest import IngestConfig, ingest


def make_pdf(path: Path, pages: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.new("RGB", (120, 160), (40 * i % 255, 90, 200)) for i in range(pages)]
    images[0].save(path, save_all=True, append_images=images[1:])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("pdfs")
    make_pdf(src / "report.pdf", 3)
    make_pdf(src / "My Slides (v2).pdf", 2)  # ingest names it My-Slides-v2
    make_pdf(src / "deck_a.pdf", 4)  # a SlideVQA deck
    make_pdf(src / "2023" / "annual.pdf", 2)
    make_pdf(src / "2024" / "annual.pdf", 3)  # renamed at ingest: annual-<hash>
    out = tmp_path_factory.mktemp("corpus")
    assert ingest([src], out, IngestConfig(dpi=20), progress=False).ok
    return out


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


def example(uid, query, answer, file_name, pages, **categories):
    return {
        "uid": uid,
        "query": query,
        "reference_answer": answer,
        "meta_info": {"file_name": file_name, "reference_page": pages, **categories},
    }


def by_qid(records):
    return {r.qid: r for r in records}


def test_vidoseek_unified_json_every_query_type_variant(corpus, tmp_path):
    rows = [
        example(1, "q1", "a1", "report.pdf", [2], query_type="single_hop", source_type="Text"),
        example("x7", "q2", "a2", "report.pdf", [1, 3], query_type="Multi-Hop", source_type="chart"),
        example(3, "q3", "a3", "My Slides (v2).pdf", [2], query_type="content_extraction", source_type="2d_layout"),
        example(4, "q4", "a4", "report.pdf", [1], query_type="counterfactual", source_type="table"),
        example(5, "q5", "a5", "gone.pdf", [4], query_type="single_hop", source_type="text"),
        example(6, "q6", "a6", "report.pdf", [9], query_type="multi_hop", source_type="text"),
        example(1, "q1 again", "a1", "report.pdf", [1], query_type="single_hop", source_type="text"),
    ]
    records, report = convert("unified", write_json(tmp_path / "vidoseek.json", {"examples": rows}), corpus)
    got = by_qid(records)
    assert list(got) == [f"vidoseek:{u}" for u in (1, "x7", 3, 4, 5, 6)] + ["vidoseek:1#2"]
    assert got["vidoseek:1"].gold_pages == ["report_2"] and got["vidoseek:1"].category == "extraction"
    assert got["vidoseek:x7"].gold_pages == ["report_1", "report_3"] and got["vidoseek:x7"].category == "logic"
    assert got["vidoseek:3"].gold_pages == ["My-Slides-v2_2"] and got["vidoseek:3"].category == "extraction"
    # Unknown values pass through unchanged and are reported; raw fields are kept.
    assert got["vidoseek:4"].category == "counterfactual"
    assert report.unknown_categories == {"vidoseek/counterfactual": 1}
    assert json.loads(got["vidoseek:x7"].raw_category) == {
        "query_type": "Multi-Hop",
        "source_type": "chart",
    }
    # Gold pages outside the corpus are kept and reported, never dropped.
    assert got["vidoseek:5"].gold_pages == ["gone_4"] and report.missing_documents == {"gone.pdf": ["vidoseek:5"]}
    assert ["vidoseek:6", "report_9"] in report.missing_pages and ["vidoseek:5", "gone_4"] in report.missing_pages
    assert report.renamed_questions == [["vidoseek:1", "vidoseek:1#2"]]
    assert report.rows == report.converted == 7
    assert {r.data_source for r in records} == {"vidoseek"}


def test_slidevqa_refined_and_mmlongbench_rows_in_the_unified_format(corpus, tmp_path):
    rows = [
        example(1, "q", "a", "deck_a.pdf", [1], query_type="Single-Hop_Single-Span"),
        example(2, "q", "a", "deck_a.pdf", [2, 4], query_type="Multi-Hop_Multi-Span"),
        example(3, "q", "a", "deck_a.pdf", [3], query_type="single_hop", source_type="single_span"),
        example(4, "q", "a", "report.pdf", [2], source_type=["Chart", "Table"], doc_type="Report", answer_format="Int"),
        example(5, "q", "a", "report.pdf", [3], source_type=["Generalized-text (Layout)"], doc_type="Guide"),
    ]
    records, report = convert("unified", write_json(tmp_path / "rag_dataset.json", {"examples": rows}), corpus)
    got = {r.qid: (r.data_source, r.category, r.gold_pages) for r in records}
    assert got == {
        "slidevqa:1": ("slidevqa", "single_hop", ["deck_a_1"]),
        "slidevqa:2": ("slidevqa", "multi_hop", ["deck_a_2", "deck_a_4"]),
        "slidevqa:3": ("slidevqa", "single_hop", ["deck_a_3"]),
        "mmlongbench:4": ("mmlongbench", "table|chart", ["report_2"]),  # in Table 1's column order
        "mmlongbench:5": ("mmlongbench", "layout", ["report_3"]),
    }
    assert report.unknown_categories == {} and report.missing_pages == []
    # --source overrides the inference.
    records, _ = convert("unified", tmp_path / "rag_dataset.json", corpus, source="vidoseek")
    assert {r.data_source for r in records} == {"vidoseek"}


def test_mmlongbench_samples_json_keeps_the_evaluated_subset(corpus, tmp_path):
    samples = [
        {"doc_id": "report.pdf", "doc_type": "Research report", "question": "q0", "answer": "12",
         "evidence_pages": "[2]", "evidence_sources": "['Chart']", "answer_format": "Int"},
        {"doc_id": "report.pdf", "doc_type": "Research report", "question": "q1", "answer": "Not answerable",
         "evidence_pages": "[]", "evidence_sources": "[]", "answer_format": "None"},
        {"doc_id": "report.pdf", "doc_type": "Guide", "question": "q2", "answer": "x",
         "evidence_pages": "[]", "evidence_sources": "['Table']", "answer_format": "Str"},
        {"doc_id": "annual.pdf", "doc_type": "Guide", "question": "q3", "answer": "['a', 'b']",
         "evidence_pages": "[1, 2]", "evidence_sources": "['Pure-text (Plain-text)', 'Generalized-text (Layout)']",
         "answer_format": "List"},
        {"doc_id": "report.pdf", "doc_type": "Guide", "question": "q4", "answer": "y",
         "evidence_pages": "[3]", "evidence_sources": "['Hand-drawn']", "answer_format": "Str"},
    ]  # fmt: skip
    records, report = convert("mmlongbench", write_json(tmp_path / "samples.json", samples), corpus)
    assert [r.qid for r in records] == ["mmlongbench:0", "mmlongbench:3", "mmlongbench:4"]
    assert report.excluded == {"not answerable": 1, "no evidence pages": 1} and report.rows == 5
    got = by_qid(records)
    assert got["mmlongbench:0"].category == "chart" and got["mmlongbench:0"].gold_pages == ["report_2"]
    assert got["mmlongbench:3"].category == "text|layout"
    # Two ingested files are named annual.pdf: the one that kept the name is used, and the clash is reported.
    assert got["mmlongbench:3"].gold_pages == ["annual_1", "annual_2"]
    assert list(report.ambiguous_documents) == ["annual.pdf"] and len(report.ambiguous_documents["annual.pdf"]) == 2
    assert got["mmlongbench:4"].category == "Hand-drawn" and report.unknown_categories == {"mmlongbench/Hand-drawn": 1}
    assert json.loads(got["mmlongbench:0"].raw_category)["evidence_sources"] == ["Chart"]


def test_slidevqa_original_jsonl(corpus, tmp_path):
    lines = [
        {"deck_name": "deck_a", "deck_url": "u", "image_urls": [], "qa_id": 11, "question": "q", "answer": "7",
         "arithmetic_expression": "3+4", "evidence_pages": [2, 3], "reasoning_type": "Multi-hop",
         "answer_type": "Non-Span"},
        {"deck_name": "deck_a", "deck_url": "u", "image_urls": [], "qa_id": 12, "question": "q", "answer": "x",
         "arithmetic_expression": "None", "evidence_pages": [1], "reasoning_type": "Single-hop",
         "answer_type": "Single-Span"},
    ]  # fmt: skip
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    records, report = convert("slidevqa", path, corpus)
    assert [(r.qid, r.category, r.gold_pages) for r in records] == [
        ("slidevqa:11", "multi_hop", ["deck_a_2", "deck_a_3"]),
        ("slidevqa:12", "single_hop", ["deck_a_1"]),
    ]
    assert set(PAPER_COLUMNS["slidevqa"]) == {"single_hop", "multi_hop"}


def test_command_writes_qa_and_report_appends_and_refuses_clashes_and_bad_files(corpus, tmp_path, capsys):
    work = tmp_path / "corpus"
    work.mkdir()
    for name in ("pages.parquet", "pages"):
        (work / name).symlink_to(corpus / name)
    one = write_json(tmp_path / "a.json", {"examples": [example(1, "q", "a", "report.pdf", [1], query_type="x")]})
    two = write_json(tmp_path / "b.json", {"examples": [example(2, "q", "a", "report.pdf", [2], query_type="x")]})
    assert main(["unified", str(one), "--corpus", str(work), "--source", "vidoseek"]) == 0
    assert main(["unified", str(two), "--corpus", str(work), "--source", "vidoseek", "--append"]) == 0
    assert [r.qid for r in load_qa(work)] == ["vidoseek:1", "vidoseek:2"]
    assert json.loads((work / "convert_report.json").read_text())["converted"] == 1
    assert main(["unified", str(two), "--corpus", str(work), "--source", "vidoseek", "--append"]) == 1
    assert "already in" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"examples": [{"uid": 1}]}')
    assert main(["unified", str(bad), "--corpus", str(work)]) == 1
    assert "not in the unified format" in capsys.readouterr().err
    assert [r.qid for r in load_qa(work)] == ["vidoseek:1", "vidoseek:2"]  # nothing lost
