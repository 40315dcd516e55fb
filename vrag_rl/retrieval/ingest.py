"""Ingest PDFs, images and videos into a page corpus: ``pages/{doc}_{page}.jpg`` (pages 1-based) + ``pages.parquet``.

    python -m vrag_rl.retrieval.ingest SRC... --out CORPUS [--dpi 144] [--max-side 2048] [--max-pages 1000]

SRC are files or directories (walked recursively, hidden entries skipped); all inputs are processed in the
sorted order of their absolute paths. PDFs are rendered by PDFium at ``dpi``; every page, rendered or read
from an image, is scaled down to at most ``max_side`` pixels on its longer side and stored as an RGB JPEG.
A page longer than ``MAX_PAGE_ASPECT`` times its width (or the other way round), such as a 4100x20 strip, is
padded with white on its short side (below or to the right, so coordinates of its content do not move) up to
that ratio: the vision processors refuse ratios over 200, and the margin keeps their rounding below it.
Multi-frame TIFFs give one page per frame. Videos (mp4, webm, mkv, mov) give one page per sampled frame, with its
time in the video as the row's ``timestamp`` (``retrieval.video``). Manifest rows have kind "pdf", "image" or
"video", the absolute source path and the sha256 of the JPEG file; rows are sorted by (doc, page).

Document names: ``doc`` is the file stem in Unicode NFC with each run of characters other than letters and
digits of any script, ``.``, ``_`` and ``-`` replaced by ``-`` (``報告書.pdf`` is ``報告書``). A name belongs to
the first source that yields a page, compared case-insensitively (corpora get copied to case-insensitive file
systems): a source already in this corpus's manifest, else the first in sorted order. A later source with the
same name (``2023/annual.pdf`` and ``2024/annual.pdf``, ``Über.pdf`` and ``über.pdf``) is ingested under the
name plus the first 8 hex digits of its sha256 (``annual-3fa2b1c4``), then ``-2``, ``-3``... should that be
taken too; every such renaming is listed in the summary and the report. No document is dropped for its name.

Resuming: the manifest's parquet metadata records, per source, the sha256 of the source file and the render
settings. A rerun reuses a page when both are unchanged and the page file's sha256 still equals the manifest
checksum; everything else is rendered again. Files are written to a temporary file and ``os.replace``d, and
the manifest is rewritten every ``checkpoint_seconds`` and at the end, so a killed run loses only the pages
after its last checkpoint; the next run deletes temporary files left by a kill. Documents of earlier runs
that are not among the inputs stay in the corpus; page images that a manifest listed or the run wrote and no row
refers to any more (pages past a lowered ``max_pages``, or of a source that changed) are deleted at the end of a
run; no other file is ever deleted. A source inside the corpus (or the corpus itself, or a source holding it) is
refused before anything is written. One writer at a time per corpus
(ingest or OCR, ``records.writer_lock``): a second one stops at once with a message naming the first.

Bad inputs (see ``REASONS``) are listed in the summary and in ``CORPUS/ingest_report.json`` and skipped; a
bad page of a PDF or multi-frame TIFF skips that page only. Images and video frames of more than ``max_pixels``
pixels are refused before decoding (decompression bombs). A document gives at most ``max_pages`` pages (1000 by
default; a video, its first ``max_pages`` sampled frames): a document cut there is listed as ``capped`` in the
summary and the report. PDFium renders in a child process shared by the run, and a PDF page not rendered within
``page_timeout_s`` is skipped (``PDF timeout``). The exit code is 0 when any page was ingested, else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from vrag_rl.data.records import (
    PAGES_SCHEMA,
    PageRecord,
    atomic_write_bytes,
    doc_name,
    page_id,
    sha256_file,
    sha256_hex,
    write_pages,
    writer_lock,
)
from vrag_rl.data.synthetic import encode_jpeg
from vrag_rl.progress import progress_bar
from vrag_rl.retrieval.pdf import PdfRenderer
from vrag_rl.retrieval.sources import IMAGE_SUFFIXES, KINDS, OPENERS, BadInput, IngestConfig, open_pdf
from vrag_rl.retrieval.video import VIDEO_SUFFIXES, FrameSampling

REASONS = (
    "not found",
    "unsupported type",
    "unreadable",
    "empty file",
    "corrupt PDF",
    "encrypted PDF",
    "empty PDF",
    "corrupt image",
    "truncated image",
    "decompression bomb",
    "PDF timeout",
    "corrupt video",
    "truncated video",
    "page file missing",
)
STATE_KEY = "vrag_rl.ingest"  # parquet metadata key of the resume state
STATE_VERSION = 1


@dataclass(frozen=True)
class Problem:
    source: str
    reason: str  # one of REASONS
    detail: str = ""
    page: int | None = None  # 1-based, when only this page of the source was skipped


@dataclass
class IngestResult:
    out_dir: str
    pages_written: int = 0
    pages_reused: int = 0
    docs: list[str] = field(default_factory=list)  # documents of this run's inputs with at least one page
    problems: list[Problem] = field(default_factory=list)
    renamed: list[dict[str, str]] = field(default_factory=list)  # {source, doc, detail}: its stem was taken
    capped: list[dict[str, str]] = field(default_factory=list)  # {source, doc, detail}: cut to max_pages

    @property
    def ok(self) -> bool:
        return self.pages_written + self.pages_reused > 0

    def summary(self) -> str:
        lines = [
            f"ingested {len(self.docs)} documents into {self.out_dir}: "
            f"{self.pages_written} pages written, {self.pages_reused} reused"
        ]
        for r in self.renamed:
            lines.append(f"  renamed            {r['source']}: document {r['doc']!r} ({r['detail']})")
        for r in self.capped:
            lines.append(f"  capped             {r['source']}: {r['detail']}")
        if self.problems:
            lines.append(f"skipped {len(self.problems)}:")
            for p in self.problems:
                where = f"{p.source} (page {p.page})" if p.page is not None else p.source
                lines.append(f"  {p.reason:<18} {where}: {p.detail}")
        return "\n".join(lines)


def check_sources(sources: Sequence[str | Path], out: Path) -> None:
    """Refuse a source inside the corpus, the corpus itself, or a source that holds the corpus: ingest would take
    its own pages for new documents (``scan``, ``scan_1``, ``scan_1_1``...), or its page files for orphans."""
    corpus = out.resolve()
    for s in sources:
        source = Path(s).resolve()
        if source == corpus or corpus in source.parents:
            raise ValueError(f"source {s} is inside the corpus {out}: ingest from a folder outside --out")
        if source in corpus.parents:
            raise ValueError(f"the corpus {out} is inside the source {s}: give --out a folder outside the sources")


def collect_inputs(sources: Sequence[str | Path]) -> tuple[list[Path], list[Problem]]:
    """Files named by ``sources`` (directories walked, hidden entries skipped), sorted."""
    found: set[Path] = set()
    problems = []
    for s in sources:
        path = Path(os.path.abspath(s))  # not resolve(): a symlink's own name is the document name
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found.update(Path(root, f) for f in files if not f.startswith("."))
        elif path.exists():
            found.add(path)
        else:
            problems.append(Problem(str(path), "not found", "no such file or directory"))
    return sorted(found, key=str), problems


def _remove_temp_files(out: Path) -> None:
    """Temporary files of a killed run (``atomic_write_bytes`` names them ``.{name}.*.tmp``)."""
    for d in (out, out / "pages"):
        for f in d.glob(".*.tmp"):
            f.unlink(missing_ok=True)


def _checksum_ok(path: Path, checksum: str) -> bool:
    return path.is_file() and sha256_file(path) == checksum


class _Corpus:
    """The manifest being built: rows by doc and page, the resume state by source, name owners."""

    def __init__(self, out: Path, cfg: IngestConfig, result: IngestResult, pdf: PdfRenderer) -> None:
        self.out, self.cfg, self.result = out, cfg, result
        self.openers = {**OPENERS, "pdf": partial(open_pdf, renderer=pdf)}  # one PDFium process for the run
        self.old: dict[str, PageRecord] = {}  # by page id, as found at the start
        self.state: dict[str, dict] = {}
        path = out / "pages.parquet"
        if path.exists():
            try:
                table = pq.read_table(path, schema=PAGES_SCHEMA)
                meta = json.loads((pq.read_schema(path).metadata or {}).get(STATE_KEY.encode(), b"{}"))
            except Exception as err:
                msg = f"{path} is not a readable page manifest ({err}); move it away to start afresh"
                raise ValueError(msg) from err
            self.old = {r["page_id"]: PageRecord(**r) for r in table.to_pylist()}
            if meta.get("version") == STATE_VERSION:
                self.state = meta["sources"]
        self.rows: dict[str, dict[int, PageRecord]] = {}
        for r in self.old.values():
            self.rows.setdefault(r.doc, {})[r.page] = r
        self.owners = {r.doc.casefold(): r.source for r in self.old.values()}
        self.written: set[str] = set()  # page files this run wrote (corpus-relative)
        self.last_write = time.monotonic()

    def write(self, force: bool = True) -> None:
        if not force and time.monotonic() - self.last_write < self.cfg.checkpoint_seconds:
            return
        records = [r for doc in sorted(self.rows) for _, r in sorted(self.rows[doc].items())]
        live = {r.source for r in records}
        state = {"version": STATE_VERSION, "sources": {s: v for s, v in self.state.items() if s in live}}
        write_pages(records, self.out / "pages.parquet", metadata={STATE_KEY: json.dumps(state, sort_keys=True)})
        self.last_write = time.monotonic()

    def _free_name(self, name: str, source: str, sha256: str) -> str:
        """``name``, or when another source owns it, the name plus a short content hash (then a counter)."""
        candidates = [name, f"{name}-{sha256[:8]}"] + [f"{name}-{sha256[:8]}-{k}" for k in range(2, 10_000)]
        return next(c for c in candidates if self.owners.get(c.casefold(), source) == source)

    def add_source(self, path: Path, bar: tqdm) -> None:
        """Render (or reuse) the pages of one input; raises BadInput when the whole input is unusable."""
        source, suffix = str(path), path.suffix.lower()
        kind = next((k for k, suffixes in KINDS.items() if suffix in suffixes), None)
        if kind is None or not path.is_file():
            known = "/".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))
            raise BadInput("unsupported type", f"not a PDF, image or video ({known}) file")
        try:
            empty, source_state = path.stat().st_size == 0, {"sha256": sha256_file(path)}
        except OSError as err:
            raise BadInput("unreadable", str(err)) from err
        if empty:
            raise BadInput("empty file", "zero bytes")
        doc = self._free_name(doc_name(path), source, source_state["sha256"])
        source_state["settings"] = self.cfg.render_settings(video=kind == "video")
        with self.openers[kind](path, self.cfg) as (count, render, times, problem):
            if problem is not None:
                self.result.problems.append(Problem(source, *problem))
            if count == 0:
                raise BadInput("empty PDF", "the document has no pages")
            if count > self.cfg.max_pages:
                self._capped(source, doc, count, times)
                count = self.cfg.max_pages
            unchanged = self.state.get(source) == source_state
            self.state[source], pages = source_state, {}
            self.rows[doc] = pages  # replaces the rows of an earlier run, page by page below
            bar.total += count
            bar.set_postfix_str(doc)
            for number in range(1, count + 1):
                pid = page_id(doc, number)
                old, file = self.old.get(pid), f"pages/{pid}.jpg"
                if unchanged and old and old.source == source and _checksum_ok(self.out / file, old.checksum):
                    pages[number] = old
                    self.result.pages_reused += 1
                else:
                    try:
                        image = render(number - 1)
                    except BadInput as err:
                        self.result.problems.append(Problem(source, err.reason, err.detail, number))
                        continue
                    data = encode_jpeg(image, self.cfg.jpeg_quality)
                    atomic_write_bytes(self.out / file, data)
                    self.written.add(file)
                    pages[number] = PageRecord(pid, doc, number, *image.size, kind, file, source, sha256_hex(data))
                    if times is not None:
                        pages[number] = dataclasses.replace(pages[number], timestamp=round(times[number - 1], 3))
                    self.result.pages_written += 1
                bar.update()
                self.write(force=False)
        if pages:
            self.result.docs.append(doc)
            self.owners[doc.casefold()] = source  # claimed once a page is in: broken files block no name
            if doc != doc_name(path):
                owner = self.owners[doc_name(path).casefold()]
                self.result.renamed.append({"source": source, "doc": doc, "detail": f"the name belongs to {owner}"})
        else:
            del self.rows[doc]

    def _capped(self, source: str, doc: str, count: int, times: list[float] | None) -> None:
        cap = self.cfg.max_pages
        detail = f"the first {cap} of {count} pages"
        if times is not None:  # a video's count is the cap + 1: sampling stopped there
            detail = f"the first {cap} frames, to {times[cap - 1]:.1f} s"
        self.result.capped.append({"source": source, "doc": doc, "detail": f"{detail} (--max-pages {cap})"})

    def drop_missing_pages(self) -> None:
        """Rows of earlier runs whose image file is gone (this run did not render their source)."""
        for doc in list(self.rows):
            for number, r in list(self.rows[doc].items()):
                if not (self.out / r.file).is_file():
                    self.result.problems.append(Problem(r.source, "page file missing", r.file, number))
                    del self.rows[doc][number]
            if not self.rows[doc]:
                del self.rows[doc]

    def remove_orphans(self) -> None:
        """Page images that the manifest listed at the start or this run wrote, and that no row refers to now
        (pages past a lowered --max-pages, of a changed source). Any other file is not ours to delete."""
        ours = {r.file for r in self.old.values()} | self.written
        kept = {r.file for pages in self.rows.values() for r in pages.values()}
        pages = (self.out / "pages").resolve()
        for file in sorted(ours - kept):
            path = (self.out / file).resolve()
            if path.parent == pages:  # a manifest row naming a file elsewhere is no licence to delete it
                path.unlink(missing_ok=True)


def ingest(
    sources: Sequence[str | Path], out_dir: str | Path, cfg: IngestConfig = IngestConfig(), progress: bool = True
) -> IngestResult:
    out = Path(os.path.abspath(out_dir))
    check_sources(sources, out)
    (out / "pages").mkdir(parents=True, exist_ok=True)
    # one writer per corpus (ingest or OCR): its temporary files are its own
    with writer_lock(out, "corpus"), PdfRenderer(cfg.page_timeout_s) as pdf:
        return _ingest(sources, out, cfg, progress, pdf)


def _ingest(
    sources: Sequence[str | Path], out: Path, cfg: IngestConfig, progress: bool, pdf: PdfRenderer
) -> IngestResult:
    _remove_temp_files(out)
    result = IngestResult(str(out))
    corpus = _Corpus(out, cfg, result, pdf)
    files, result.problems = collect_inputs(sources)
    bar = progress_bar(total=0, unit="page", desc="ingest", disable=not progress)
    try:
        for path in files:
            try:
                corpus.add_source(path, bar)
            except BadInput as err:
                result.problems.append(Problem(str(path), err.reason, err.detail))
        corpus.drop_missing_pages()
    finally:  # also on Ctrl-C: the pages finished so far stay in the manifest
        bar.close()
        corpus.write()
    corpus.remove_orphans()
    report = {**asdict(result), "settings": cfg.render_settings(), "ok": result.ok}
    atomic_write_bytes(out / "ingest_report.json", json.dumps(report, indent=2).encode())
    return result


def main(argv: list[str] | None = None) -> int:
    d = IngestConfig()
    p = argparse.ArgumentParser(
        prog="python -m vrag_rl.retrieval.ingest",
        description="Turn PDFs, images and videos into a page corpus (pages/*.jpg + pages.parquet).",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="PDF, image or video files, or directories to walk")
    p.add_argument("--out", required=True, help="corpus directory (created; an existing corpus is resumed/extended)")
    p.add_argument("--dpi", type=float, default=d.dpi, help="PDF render resolution")
    p.add_argument("--max-side", type=int, default=d.max_side, help="cap on the longer page side, in pixels")
    p.add_argument("--max-pages", type=int, default=d.max_pages, help="the first N pages (or frames) of a document")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="larger images and frames: bombs")
    p.add_argument("--page-timeout", type=float, default=d.page_timeout_s, help="seconds to render one PDF page")
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    p.add_argument("--checkpoint-seconds", type=float, default=d.checkpoint_seconds)
    p.add_argument("--video-interval", type=float, default=d.video.interval_s, help="video: a frame every N s")
    p.add_argument("--scene-change", type=float, default=d.video.scene_change, help="video: and at changes this big")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        video = FrameSampling(interval_s=args.video_interval, scene_change=args.scene_change)
        cfg = IngestConfig(
            args.dpi, args.max_side, args.max_pages, args.max_pixels, args.jpeg_quality, args.checkpoint_seconds, video,
            page_timeout_s=args.page_timeout,
        )  # fmt: skip
    except ValueError as err:
        p.error(str(err))
    try:
        result = ingest(args.sources, args.out, cfg, progress=not args.no_progress)
    except ValueError as err:  # sources and corpus that overlap, an unreadable manifest: nothing was changed
        p.error(str(err))
    print(result.summary())
    print(f"report: {Path(result.out_dir) / 'ingest_report.json'}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
