"""Question and page records of a page corpus, and their parquet files.

A corpus directory holds ``pages/{doc}_{page}.jpg``, ``pages.parquet`` (one row per page image) and
``qa.parquet`` (one row per question). In ``qa.parquet`` ``gold_pages`` is ``list<string>`` and
``answer_box`` is a nullable ``struct<page_id: string, x0: int32, y0: int32, x1: int32, y1: int32>``:
the pixel box, in the raw page image, that tightly holds the rendered answer (null when unknown);
``category`` holds the Table 1 columns of the question joined by ``|`` (``data.convert``) and
``raw_category`` the annotation's own category fields as JSON.
In ``pages.parquet`` ``file`` is relative to the corpus directory, ``source`` says where the page came from (an
ingested file's absolute path, or the generator) and ``checksum`` is the sha256 of the page image file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

AnswerBox = tuple[str, int, int, int, int]  # (page_id, x0, y0, x1, y1), x1/y1 exclusive

QA_SCHEMA = pa.schema(
    [
        ("qid", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("gold_pages", pa.list_(pa.string())),
        (
            "answer_box",
            pa.struct(
                [
                    ("page_id", pa.string()),
                    ("x0", pa.int32()),
                    ("y0", pa.int32()),
                    ("x1", pa.int32()),
                    ("y1", pa.int32()),
                ]
            ),
        ),
        ("category", pa.string()),
        ("entity", pa.string()),
        ("data_source", pa.string()),
        ("raw_category", pa.string()),  # the annotation's own category fields as JSON ("" when none)
    ]
)

PAGES_SCHEMA = pa.schema(
    [
        ("page_id", pa.string()),
        ("doc", pa.string()),
        ("page", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("kind", pa.string()),
        ("file", pa.string()),  # relative to the corpus directory
        ("source", pa.string()),  # where the page came from: an input file's absolute path, or a generator
        ("checksum", pa.string()),  # sha256 (hex) of the page image file's bytes
        ("timestamp", pa.float64()),  # a video frame's time in the video, in seconds (null for other pages)
    ]
)


@dataclass(frozen=True)
class QARecord:
    qid: str
    question: str
    answer: str
    gold_pages: list[str]
    answer_box: AnswerBox | None
    category: str
    entity: str
    data_source: str
    raw_category: str = ""


@dataclass(frozen=True)
class PageRecord:
    page_id: str  # "{doc}_{page}"
    doc: str
    page: int  # 1-based
    width: int
    height: int
    kind: str
    file: str  # as stored: relative to the corpus directory; load_pages resolves it
    source: str
    checksum: str  # sha256 hex of the image file; readers can detect a changed or damaged page
    timestamp: float | None = None  # kind "video": the frame's time in the video, in seconds


def page_id(doc: str, page: int) -> str:
    return f"{doc}_{page}"


def page_label(page_id: str, timestamp: float | None) -> str:
    """A page id as people read it: a video frame's with its time in the video."""
    return page_id if timestamp is None else f"{page_id} (at {timestamp:.1f} s)"


def doc_name(path: Path) -> str:
    """The document name ingest gives a file (before clashes are resolved): its stem in NFC, each run of
    characters other than letters and digits of any script, ``.``, ``_`` and ``-`` replaced by ``-``."""
    return re.sub(r"[^\w.-]+", "-", unicodedata.normalize("NFC", path.stem)).strip(".-") or "doc"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in chunks so multi-GB files never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def page_checksum(record: PageRecord) -> str:
    """sha256 of the page image: the corpus manifest's ``checksum`` when it has one, else the file's bytes."""
    if getattr(record, "checksum", ""):
        return record.checksum
    return sha256_file(record.file)


class WriterBusy(RuntimeError):
    """Another process is writing the same corpus or index."""


@contextmanager
def writer_lock(directory: Path, what: str):
    """Hold the one writer's lock of ``directory`` (``DIR/.writer.lock``, an advisory ``flock``, released by the
    kernel when the process dies); a second writer stops at once with ``WriterBusy`` naming the holder."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".writer.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise WriterBusy(
                f"{what} {directory} is being written by another process ({holder}); run one writer at a time"
            ) from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def temp_path(path: Path) -> Path:
    """A fresh temporary file beside ``path`` (``.{name}.*.tmp``), for writing it and renaming it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same directory, so ``path`` is either absent or complete."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; corpus files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def write_qa(records: list[QARecord], path: Path) -> None:
    rows = []
    for r in records:
        box = None
        if r.answer_box is not None:
            box = dict(zip(("page_id", "x0", "y0", "x1", "y1"), r.answer_box))
        rows.append({**r.__dict__, "gold_pages": list(r.gold_pages), "answer_box": box})
    _atomic_write_table(pa.Table.from_pylist(rows, schema=QA_SCHEMA), path)


def write_pages(pages: list[PageRecord], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``metadata`` goes into the parquet schema's key-value metadata (the ingester keeps its resume state there)."""
    schema = PAGES_SCHEMA.with_metadata(metadata) if metadata else PAGES_SCHEMA
    _atomic_write_table(pa.Table.from_pylist([p.__dict__ for p in pages], schema=schema), path)


def load_qa(corpus_dir: str | Path) -> list[QARecord]:
    """The corpus's questions in file order; a question id given twice is an error (it would score answers
    against another question), named with its rows."""
    out = []
    table = pq.read_table(Path(corpus_dir) / "qa.parquet")
    if "raw_category" not in table.column_names:  # written before the column existed
        table = table.append_column("raw_category", pa.array([""] * len(table), pa.string()))
    for row in table.select(QA_SCHEMA.names).cast(QA_SCHEMA).to_pylist():
        box = row["answer_box"]
        if box is not None:
            box = (box["page_id"], box["x0"], box["y0"], box["x1"], box["y1"])
        out.append(QARecord(**{**row, "answer_box": box}))
    rows: dict[str, list[int]] = {}
    for i, r in enumerate(out):
        rows.setdefault(r.qid, []).append(i)
    twice = {qid: ix for qid, ix in rows.items() if len(ix) > 1}
    if twice:
        named = ", ".join(f"{qid!r} (rows {ix})" for qid, ix in list(twice.items())[:5])
        raise ValueError(f"{Path(corpus_dir) / 'qa.parquet'}: {len(twice)} question ids appear more than once: {named}")
    return out


def holdout_split(records: list[QARecord], every: int) -> tuple[list[QARecord], list[QARecord]]:
    """(kept, held out): every ``every``-th record is held out. The main job and the cached warm start split
    alike, so a run that starts from the warm policy validates on questions it was never trained on."""
    if every < 2:
        raise ValueError(f"every must be >= 2, got {every}")
    return [r for i, r in enumerate(records) if i % every], records[::every]


def _inside(root: str, path: str) -> bool:
    return path != root and os.path.commonpath([root, path]) == root


def load_pages(corpus_dir: str | Path) -> list[PageRecord]:
    """Page rows with ``file`` joined to ``corpus_dir``. A row whose ``file``, so joined, lies outside the corpus
    directory (``../x.jpg``, an absolute path elsewhere) is not one of the corpus's pages: the manifest is refused
    with the rows named. (Symlinks are resolved where a page is read: ``retrieval.base.PageCatalog``.)"""
    corpus_dir = Path(corpus_dir)
    table = pq.read_table(corpus_dir / "pages.parquet")
    if "timestamp" not in table.column_names:  # written before video frames were pages
        table = table.append_column("timestamp", pa.nulls(len(table), pa.float64()))
    rows = table.select(PAGES_SCHEMA.names).cast(PAGES_SCHEMA).to_pylist()
    root = os.path.abspath(corpus_dir)
    outside = [r for r in rows if not _inside(root, os.path.normpath(os.path.join(root, r["file"])))]
    if outside:
        named = ", ".join(f"{r['page_id']!r} ({r['file']!r})" for r in outside[:5])
        raise ValueError(
            f"{corpus_dir / 'pages.parquet'}: {len(outside)} rows name files outside the corpus: {named}; "
            "a manifest lists files under its corpus directory only"
        )
    return [PageRecord(**{**row, "file": str(corpus_dir / row["file"])}) for row in rows]
