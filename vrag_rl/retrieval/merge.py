"""Several corpora into one page pool, the evaluation protocol's setting: every question searches all pages.

    python -m vrag_rl.retrieval.merge CORPUS... --out POOL

Pages keep their ids where those are unique. The same page id with the same image (a document in two
benchmarks) becomes one page; the same id with another image is a different document with the same name:
the later corpus's document is renamed ``{doc}-{corpus folder name}`` and its questions' gold pages follow.
Question ids must differ across corpora (the converters prefix them with the data source). ``ocr.parquet``
rows are carried over where every corpus has them, so text search needs no new OCR pass. Page files are
hard-linked where the file system allows, else copied. The pool gets ``pages.parquet``, ``qa.parquet``,
``merge_report.json``; index it like any corpus (``python -m vrag_rl.retrieval.index build --corpus POOL``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vrag_rl.data.records import (
    PageRecord,
    QARecord,
    atomic_write_bytes,
    load_pages,
    load_qa,
    page_id,
    write_pages,
    write_qa,
    writer_lock,
)
from vrag_rl.retrieval.ocr import OCR_FILE, OCR_SCHEMA, load_ocr


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def _renamed(record: QARecord, mapping: dict[str, str]) -> QARecord:
    box = record.answer_box
    if box is not None and box[0] in mapping:
        box = (mapping[box[0]], *box[1:])
    return replace(record, gold_pages=[mapping.get(p, p) for p in record.gold_pages], answer_box=box)


def plan_merge(corpora: list[Path]) -> tuple[list[tuple[Path, PageRecord]], list[QARecord], dict]:
    """(source file and pool row of every page, the pool's questions, the report) without writing anything."""
    pool: dict[str, tuple[Path, PageRecord]] = {}
    questions: list[QARecord] = []
    report: dict = {"corpora": [str(c) for c in corpora], "shared_pages": 0, "renamed_documents": [], "pages": {}}
    owner: dict[str, str] = {}  # question id -> corpus
    for corpus in corpora:
        pages = load_pages(corpus)
        clashing = {p.doc for p in pages if p.page_id in pool and pool[p.page_id][1].checksum != p.checksum}
        docs = {p.doc for p in pages} | {r[1].doc for r in pool.values()}
        renames = {}
        for doc in sorted(clashing):
            new, k = f"{doc}-{corpus.name}", 2
            while new in docs:
                new, k = f"{doc}-{corpus.name}-{k}", k + 1
            renames[doc] = new
            docs.add(new)
            report["renamed_documents"].append({"corpus": str(corpus), "doc": doc, "as": new})
        mapping = {}
        for p in pages:
            doc = renames.get(p.doc, p.doc)
            pid = page_id(doc, p.page)
            mapping[p.page_id] = pid
            if pid in pool:
                report["shared_pages"] += 1
                continue
            file = f"pages/{pid}{Path(p.file).suffix}"
            pool[pid] = (Path(p.file), replace(p, page_id=pid, doc=doc, file=file))
        report["pages"][str(corpus)] = len(pages)
        qa = load_qa(corpus) if (corpus / "qa.parquet").is_file() else []
        twice = [r.qid for r in qa if r.qid in owner]
        if twice:
            raise ValueError(f"question ids {twice[:5]} of {corpus} are also in {owner[twice[0]]}")
        owner |= {r.qid: str(corpus) for r in qa}
        questions += [_renamed(r, mapping) for r in qa]
    rows = sorted(pool.values(), key=lambda item: (item[1].doc, item[1].page))
    return rows, questions, report


def _merge_ocr(corpora: list[Path], rows: list[tuple[Path, PageRecord]], out: Path) -> bool:
    if not all((c / OCR_FILE).is_file() for c in corpora):
        return False
    by_checksum = {r.checksum: r for c in corpora for r in load_ocr(c)}
    table = [{**by_checksum[p.checksum].__dict__, "page_id": p.page_id} for _, p in rows if p.checksum in by_checksum]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(table, schema=OCR_SCHEMA), sink)
    atomic_write_bytes(out / OCR_FILE, sink.getvalue().to_pybytes())
    return True


def merge_corpora(corpora: list[Path], out: Path) -> dict:
    """Write the pool (see the module docstring); returns the report."""
    if out.resolve() in {c.resolve() for c in corpora}:
        raise ValueError(f"the pool {out} must be a new directory, not one of the corpora")
    rows, questions, report = plan_merge(corpora)
    with writer_lock(out, "corpus"):
        (out / "pages").mkdir(parents=True, exist_ok=True)
        for src, p in rows:
            _link_or_copy(src, out / p.file)
        write_pages([p for _, p in rows], out / "pages.parquet")
        write_qa(questions, out / "qa.parquet")
        report["ocr"] = _merge_ocr(corpora, rows, out)
        report |= {"pool_pages": len(rows), "questions": len(questions)}
        (out / "merge_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vrag_rl.retrieval.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("corpora", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        report = merge_corpora(a.corpora, a.out)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"{report['pool_pages']} pages ({report['shared_pages']} shared) and {report['questions']} questions in "
        f"{a.out}; {len(report['renamed_documents'])} documents renamed; OCR carried over: {report['ocr']}"
    )
    for r in report["renamed_documents"]:
        print(f"  renamed {r['doc']} of {r['corpus']} -> {r['as']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
