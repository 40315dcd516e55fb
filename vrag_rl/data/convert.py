"""Public benchmark annotations into a corpus's ``qa.parquet``.

    python -m vrag_rl.data.convert FORMAT ANNOTATIONS --corpus CORPUS [--source NAME] [--append]

``FORMAT`` is one of:

- ``unified``: ``{"examples": [{"uid", "query", "reference_answer", "meta_info": {"file_name",
  "reference_page", ...category fields}}]}`` (ViDoSeek, SlideVQA-refined, VRAG's ``rag_dataset.json``);
- ``mmlongbench``: MMLongBench-Doc's ``samples.json``, a list of rows whose ``evidence_pages`` and
  ``evidence_sources`` are Python-literal lists held in strings; the evaluated subset is kept (answerable,
  with evidence pages), the rest is counted in the report;
- ``slidevqa``: SlideVQA's original ``annotations/qa/*.jsonl`` (``deck_name``, ``evidence_pages``, ...).

Gold pages are ``{doc}_{page}`` (1-based) of the documents ingested into CORPUS, found by the annotated file
name among the ingested sources (``pages.parquet``'s ``source``), so renamings at ingest are followed. A gold
page that is not in the corpus is kept in the question's gold pages and listed in the report; nothing is
dropped. Categories become the paper's Table 1 columns (``PAPER_COLUMNS``; a question with several evidence
sources is in each of their columns, joined by ``|``); the raw category fields are kept as JSON in
``raw_category``, and values that map to no column pass through unchanged and are listed in the report.

Writes ``CORPUS/qa.parquet`` (``--append`` adds to the questions already there) and
``CORPUS/convert_report.json``.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vrag_rl.data.records import QARecord, doc_name, load_pages, load_qa, page_id, write_qa, writer_lock

FORMATS = ("unified", "mmlongbench", "slidevqa")
SLIDEVQA, VIDOSEEK, MMLONGBENCH = "slidevqa", "vidoseek", "mmlongbench"
PAPER_COLUMNS: dict[str, tuple[str, ...]] = {  # data source -> its columns in Table 1, in order
    SLIDEVQA: ("single_hop", "multi_hop"),
    VIDOSEEK: ("extraction", "logic"),
    MMLONGBENCH: ("text", "table", "chart", "figure", "layout"),
}
CATEGORY_SEPARATOR = "|"
NOT_ANSWERABLE = "Not answerable"
_MMLONG_SOURCES = {
    "pure-text (plain-text)": "text",
    "pure-text": "text",
    "plain-text": "text",
    "text": "text",
    "table": "table",
    "chart": "chart",
    "figure": "figure",
    "generalized-text (layout)": "layout",
    "layout": "layout",
    "2d_layout": "layout",
}


@dataclass
class ConversionReport:
    annotations: str
    format: str
    rows: int = 0
    converted: int = 0
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> rows (MMLongBench's unevaluated rows)
    sources: dict[str, int] = field(default_factory=dict)  # data source -> questions
    categories: dict[str, int] = field(default_factory=dict)  # "source/category" -> questions
    unknown_categories: dict[str, int] = field(default_factory=dict)  # "source/raw value" -> questions
    missing_documents: dict[str, list[str]] = field(default_factory=dict)  # file name -> question ids
    missing_pages: list[list[str]] = field(default_factory=list)  # [question id, page id] not in the corpus
    ambiguous_documents: dict[str, list[str]] = field(default_factory=dict)  # file name -> matching documents
    renamed_questions: list[list[str]] = field(default_factory=list)  # [id in the file, id given]: a repeat

    def summary(self) -> str:
        lines = [f"{self.annotations} ({self.format}): {self.converted} of {self.rows} rows converted"]
        lines += [f"  excluded {n:>6}  {reason}" for reason, n in self.excluded.items()]
        lines += [f"  {name:<28} {n:>6} questions" for name, n in sorted(self.categories.items())]
        for what, items in (
            ("unknown category", self.unknown_categories),
            ("missing document", self.missing_documents),
            ("ambiguous document", self.ambiguous_documents),
        ):
            lines += [f"  {what}: {k} ({v if isinstance(v, int) else len(v)})" for k, v in list(items.items())[:20]]
        if self.missing_pages:
            lines.append(f"  {len(self.missing_pages)} gold pages are not in the corpus (see the report)")
        if self.renamed_questions:
            lines.append(f"  {len(self.renamed_questions)} repeated question ids got a suffix (see the report)")
        return "\n".join(lines)


class CorpusDocs:
    """Maps an annotated file name (``X.pdf``, or a deck name without extension) to an ingested document."""

    def __init__(self, corpus: Path) -> None:
        pages = load_pages(corpus)
        self.page_ids = {p.page_id for p in pages}
        self.docs = {p.doc for p in pages}
        self._by_name: dict[str, set[str]] = {}
        self._by_stem: dict[str, set[str]] = {}
        for p in pages:
            self._by_name.setdefault(Path(p.source).name, set()).add(p.doc)
            self._by_stem.setdefault(Path(p.source).stem, set()).add(p.doc)

    def find(self, file_name: str, report: ConversionReport) -> str | None:
        name = Path(file_name).name
        found = self._by_name.get(name) or self._by_stem.get(name) or self._by_stem.get(Path(name).stem)
        if not found and doc_name(Path(name)) in self.docs:
            found = {doc_name(Path(name))}
        if not found:
            return None
        if len(found) > 1:  # equal file names in several folders: ingest renamed all but the first
            report.ambiguous_documents[file_name] = sorted(found)
            return doc_name(Path(name)) if doc_name(Path(name)) in found else sorted(found)[0]
        return next(iter(found))


def _norm(value: object) -> str:
    return str(value).strip().lower().replace("-", "_").replace(" ", "_")


def _hop(value: str) -> str | None:
    v = _norm(value)
    return "single_hop" if v.startswith("single") else "multi_hop" if v.startswith("multi") else None


def _vidoseek(value: str) -> str | None:
    v = _norm(value)
    if v.startswith("single") or "extraction" in v:
        return "extraction"
    return "logic" if v.startswith("multi") or "logic" in v or "reason" in v else None


def _mmlong(labels: list[str]) -> list[str | None]:
    return [_MMLONG_SOURCES.get(str(label).strip().lower()) for label in labels]


def _as_list(value: object) -> list:
    """A list, a Python/JSON literal of one held in a string, a bare value, or nothing."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return [value]
    return list(value) if isinstance(value, list | tuple) else [value]


def unified_source(meta: dict, stem: str) -> str:
    """Which benchmark a unified-JSON row belongs to, from its category fields (the file does not say)."""
    if isinstance(meta.get("source_type"), list) or "doc_type" in meta:
        return MMLONGBENCH
    if "span" in _norm(meta.get("query_type", "")) + _norm(meta.get("source_type", "")):
        return SLIDEVQA
    for name in PAPER_COLUMNS:
        if name in stem.lower():
            return name
    return VIDOSEEK if "query_type" in meta else stem


def categorize(source: str, meta: dict) -> tuple[list[str], list[str]]:
    """(Table 1 columns, raw values that map to none) of a row's category fields."""
    if source == MMLONGBENCH:
        raw = [str(v) for v in _as_list(meta.get("source_type", meta.get("evidence_sources")))]
        mapped = _mmlong(raw)
    elif source == SLIDEVQA:
        raw = [str(meta.get("query_type", meta.get("reasoning_type", "")))]
        mapped = [_hop(raw[0])]
    elif source == VIDOSEEK:
        raw = [str(meta.get("query_type", ""))]
        mapped = [_vidoseek(raw[0])]
    else:
        raw = [str(meta.get("query_type", meta.get("source_type", "")))]
        mapped = [None]
    columns = (
        sorted({m for m in mapped if m}, key=PAPER_COLUMNS.get(source, ()).index) if source in PAPER_COLUMNS else []
    )
    unknown = [r for r, m in zip(raw, mapped) if m is None and r]
    return columns + unknown, unknown


@dataclass
class Row:
    """One annotated question, before its gold pages are resolved."""

    uid: str
    question: str
    answer: str
    file_name: str
    pages: list[int]
    source: str
    meta: dict


def _answer(value: object) -> str:
    return " / ".join(str(v) for v in value) if isinstance(value, list) else str(value)


def read_unified(path: Path, source: str | None) -> list[Row]:
    examples = json.loads(path.read_text())["examples"]
    rows = []
    for i, ex in enumerate(examples):
        meta = dict(ex.get("meta_info") or {})
        rows.append(
            Row(
                str(ex.get("uid", i)),
                str(ex["query"]),
                _answer(ex.get("reference_answer", "")),
                str(meta.pop("file_name", "")),
                [int(p) for p in _as_list(meta.pop("reference_page", []))],
                source or unified_source(meta, path.stem),
                meta,
            )
        )
    return rows


def read_mmlongbench(path: Path, report: ConversionReport) -> list[Row]:
    rows, excluded = [], Counter()
    for i, sample in enumerate(json.loads(path.read_text())):
        pages = [int(p) for p in _as_list(sample.get("evidence_pages"))]
        if str(sample.get("answer", "")).strip() == NOT_ANSWERABLE:
            excluded["not answerable"] += 1
        elif not pages:
            excluded["no evidence pages"] += 1
        else:
            meta = {k: sample[k] for k in ("doc_type", "evidence_sources", "answer_format") if k in sample}
            meta["evidence_sources"] = [str(v) for v in _as_list(meta.get("evidence_sources"))]
            rows.append(
                Row(str(i), sample["question"], _answer(sample["answer"]), sample["doc_id"], pages, MMLONGBENCH, meta)
            )
    report.excluded = dict(excluded)
    return rows


def read_slidevqa(path: Path) -> list[Row]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        qa = json.loads(line)
        meta = {k: qa[k] for k in ("reasoning_type", "answer_type", "arithmetic_expression") if k in qa}
        pages = [int(p) for p in _as_list(qa.get("evidence_pages"))]
        rows.append(
            Row(str(qa["qa_id"]), qa["question"], _answer(qa["answer"]), qa["deck_name"], pages, SLIDEVQA, meta)
        )
    return rows


def to_records(rows: list[Row], docs: CorpusDocs, report: ConversionReport) -> list[QARecord]:
    records, seen = [], Counter()
    for row in rows:
        qid = f"{row.source}:{row.uid}"
        seen[qid] += 1
        if seen[qid] > 1:
            report.renamed_questions.append([qid, f"{qid}#{seen[qid]}"])
            qid = f"{qid}#{seen[qid]}"
        doc = docs.find(row.file_name, report)
        if doc is None:
            report.missing_documents.setdefault(row.file_name, []).append(qid)
        gold = [page_id(doc or doc_name(Path(row.file_name)), p) for p in row.pages]
        report.missing_pages += [[qid, g] for g in gold if g not in docs.page_ids]
        columns, unknown = categorize(row.source, row.meta)
        for value in unknown:
            key = f"{row.source}/{value}"
            report.unknown_categories[key] = report.unknown_categories.get(key, 0) + 1
        for column in columns:
            key = f"{row.source}/{column}"
            report.categories[key] = report.categories.get(key, 0) + 1
        report.sources[row.source] = report.sources.get(row.source, 0) + 1
        raw = json.dumps(row.meta, ensure_ascii=False, sort_keys=True, default=str)
        category = CATEGORY_SEPARATOR.join(columns)
        records.append(QARecord(qid, row.question, row.answer, gold, None, category, "", row.source, raw))
    report.converted = len(records)
    return records


def convert(
    fmt: str, annotations: Path, corpus: Path, source: str | None = None
) -> tuple[list[QARecord], ConversionReport]:
    """The questions of ``annotations`` with gold pages of ``corpus``, and what the conversion found."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    report = ConversionReport(str(annotations), fmt)
    try:
        if fmt == "unified":
            rows = read_unified(annotations, source)
        elif fmt == "mmlongbench":
            rows = read_mmlongbench(annotations, report)
        else:
            rows = read_slidevqa(annotations)
    except (KeyError, TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{annotations} is not in the {fmt} format: {type(err).__name__}: {err}") from err
    report.rows = len(rows) + sum(report.excluded.values())
    return to_records(rows, CorpusDocs(corpus), report), report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vrag_rl.data.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("format", choices=FORMATS)
    p.add_argument("annotations", type=Path)
    p.add_argument("--corpus", type=Path, required=True, help="the corpus the documents were ingested into")
    p.add_argument("--source", default=None, help="data source of every row (unified format; default: inferred)")
    p.add_argument("--append", action="store_true", help="add to the corpus's questions instead of replacing them")
    a = p.parse_args(argv)
    try:
        records, report = convert(a.format, a.annotations, a.corpus, a.source)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    with writer_lock(a.corpus, "corpus"):
        qa_path = a.corpus / "qa.parquet"
        kept = load_qa(a.corpus) if a.append and qa_path.is_file() else []
        clash = {r.qid for r in kept} & {r.qid for r in records}
        if clash:
            print(f"error: {len(clash)} question ids are already in {qa_path}: {sorted(clash)[:5]}", file=sys.stderr)
            return 1
        write_qa(kept + records, qa_path)
        (a.corpus / "convert_report.json").write_text(json.dumps(asdict(report), indent=1, ensure_ascii=False))
    print(report.summary())
    print(f"{len(kept) + len(records)} questions in {qa_path}; report: {a.corpus / 'convert_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
