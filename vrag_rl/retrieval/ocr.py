"""The text of every page of a corpus: a born-digital PDF's own text layer, or OCR with the ``tesseract`` binary
(Debian's tesseract-ocr).

``ocr_corpus(CORPUS, source=...)`` writes ``CORPUS/ocr.parquet``: one row per page of the manifest, in corpus
order, with columns ``page_id``, ``checksum`` (sha256 of the page image the row belongs to), ``text``,
``status`` (``ok`` | ``error`` | ``timeout``), ``error`` (a message, empty when ok) and ``source`` (``pdf``: the
text layer, ``ocr``: tesseract). Sources (``TextSource``): ``pdf`` reads the text layer of the page's source PDF
(pypdfium2, which rendered the page; a page with none has empty text), ``ocr`` reads the image, ``auto`` takes the
text layer where the page has one and tesseract where it has none (scanned pages, image files). A source PDF that
changed since ingest is not read (its layer may not be the page's any more). A page that fails is recorded with
empty text and the run goes on. The run is resumable: pages whose row says ``ok`` for the same image bytes (and
the asked source) are skipped, failed pages are tried again, rows of pages no longer in the manifest are dropped.
The file is rewritten atomically every ``flush_every`` pages and when the run stops (also on Ctrl-C), so an
interrupted run keeps its finished pages.

CLI: ``python -m vrag_rl.retrieval.ocr CORPUS [--source auto] [--lang eng] [--workers 2] [--timeout 60]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import unicodedata
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from vrag_rl.choice import Choice
from vrag_rl.data.records import (
    PageRecord,
    atomic_write_bytes,
    load_pages,
    page_checksum,
    sha256_file,
    sha256_hex,
    writer_lock,
)
from vrag_rl.progress import progress_bar
from vrag_rl.retrieval.ingest import STATE_KEY

OCR_FILE = "ocr.parquet"
OK, ERROR, TIMEOUT = "ok", "error", "timeout"


class TextSource(Choice):
    PDF = "pdf"  # the PDF's own text layer
    OCR = "ocr"  # tesseract on the page image
    AUTO = "auto"  # the text layer where the page has one, tesseract where it has none


OCR_SCHEMA = pa.schema(
    [
        ("page_id", pa.string()),
        ("checksum", pa.string()),
        ("text", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("source", pa.string()),
    ]
)


@dataclass(frozen=True)
class OcrConfig:
    lang: str = "eng"  # tesseract language pack(s), e.g. "eng" or "eng+deu"
    psm: int = 3  # page segmentation mode 3: fully automatic layout analysis
    timeout: float = 60.0  # seconds per page; the tesseract process is killed after it
    # Tesseract is tuned for ~300 dpi text; small renders (e.g. 480x640 pages) read far better when
    # upscaled first. Pages whose longer side is below this are scaled up to it (at most 4x).
    upscale_to: int = 1280
    tesseract_cmd: str = "tesseract"


@dataclass(frozen=True)
class OcrRecord:
    page_id: str
    checksum: str
    text: str
    status: str
    error: str
    source: str = TextSource.OCR  # which produced the text: pdf or ocr


class OcrError(RuntimeError):
    """Tesseract is missing, lacks the language, or failed on a page."""


def check_tesseract(cfg: OcrConfig) -> str:
    """Resolve the binary and check the language packs, so a broken install fails once, up front."""
    exe = shutil.which(cfg.tesseract_cmd)
    if exe is None:
        raise OcrError(
            f"tesseract binary {cfg.tesseract_cmd!r} not found; install Debian's tesseract-ocr and "
            "tesseract-ocr-eng (`make assets`)"
        )
    out = subprocess.run([exe, "--list-langs"], capture_output=True, text=True, timeout=30)
    langs = {line.strip() for line in out.stdout.splitlines()[1:]}  # first line is a header
    missing = [lang for lang in cfg.lang.split("+") if lang not in langs]
    if missing:
        raise OcrError(f"tesseract lacks language pack(s) {missing}; installed: {sorted(langs)}")
    return exe


def _prepare(data: bytes, upscale_to: int) -> bytes:
    """Decode (so corrupt images fail here with PIL's message), grey-scale, upscale small pages, PNG-encode."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L")
    scale = min(4.0, upscale_to / max(im.size))
    if scale > 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def ocr_image_bytes(data: bytes, cfg: OcrConfig, exe: str | None = None) -> str:
    """Text of one encoded image. Raises OcrError, ``subprocess.TimeoutExpired`` or PIL's errors."""
    png = _prepare(data, cfg.upscale_to)
    # One OpenMP thread per tesseract: pages run in parallel in the pool, and tesseract's own
    # threading only slows small pages down on a shared machine.
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    cmd = [exe or cfg.tesseract_cmd, "stdin", "stdout", "-l", cfg.lang, "--psm", str(cfg.psm)]
    out = subprocess.run(cmd, input=png, capture_output=True, timeout=cfg.timeout, env=env)
    if out.returncode != 0:
        tail = out.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise OcrError(f"tesseract exited with {out.returncode}: {' | '.join(tail)}")
    return out.stdout.decode("utf-8", "replace").strip()


_PDFIUM = threading.Lock()  # PDFium is not thread-safe: one call at a time in this process
# TeX sets an accented letter as a spacing accent before the letter ("Br¨oker"); PDFium reports both as they are,
# so each pair is made the composed letter a reader sees ("Bröker"), as poppler's pdftotext gives it.
_SPACING_ACCENTS = dict(zip("¨´`ˆ˜¸ˇ˚˘¯˙˝", "\u0308\u0301\u0300\u0302\u0303\u0327\u030c\u030a\u0306\u0304\u0307\u030b"))
_ACCENTED = re.compile(f"([{''.join(_SPACING_ACCENTS)}])(\\w)")


def _compose_accents(text: str) -> str:
    return unicodedata.normalize("NFC", _ACCENTED.sub(lambda m: m[2] + _SPACING_ACCENTS[m[1]], text))


def pdf_text(source: str | Path, page: int) -> str:
    """The text layer of page ``page`` (1-based) of a PDF, stripped; "" where the page has none."""
    import pypdfium2 as pdfium

    with _PDFIUM:
        doc = pdfium.PdfDocument(str(source))
        try:
            textpage = doc[page - 1].get_textpage()
            text = textpage.get_text_bounded()
            textpage.close()
        finally:
            doc.close()
    return _compose_accents(text.replace("\r\n", "\n")).strip()


class _Sources:
    """Whether each source PDF is still the file that was ingested (hashed once per run)."""

    def __init__(self, corpus_dir: Path):
        meta = pq.read_schema(corpus_dir / "pages.parquet").metadata or {}
        self.ingested = json.loads(meta.get(STATE_KEY.encode(), b"{}")).get("sources", {})
        self._known: dict[str, bool] = {}
        self._lock = threading.Lock()

    def unchanged(self, source: str) -> bool:
        with self._lock:
            if source not in self._known:
                want = self.ingested.get(source, {}).get("sha256")
                self._known[source] = Path(source).is_file() and (want is None or sha256_file(source) == want)
            return self._known[source]


def _page_text(page: PageRecord, cfg: OcrConfig, exe: str, mode: str, sources: _Sources) -> OcrRecord:
    """Never raises for a bad page: the failure is the record's status."""
    checksum, source = "", TextSource.OCR if mode == TextSource.OCR else TextSource.PDF
    try:
        data = Path(page.file).read_bytes()
        checksum = sha256_hex(data)
        if source == TextSource.PDF:
            layer = _text_layer(page, sources)
            if isinstance(layer, str) and (layer or mode == TextSource.PDF):
                return OcrRecord(page.page_id, checksum, layer, OK, "", source)
            if mode == TextSource.PDF:
                return OcrRecord(page.page_id, checksum, "", ERROR, layer.args[0], source)
            source = TextSource.OCR  # auto, and the page has no text layer to read
        return OcrRecord(page.page_id, checksum, ocr_image_bytes(data, cfg, exe), OK, "", source)
    except subprocess.TimeoutExpired:
        return OcrRecord(page.page_id, checksum, "", TIMEOUT, f"tesseract took longer than {cfg.timeout} s", source)
    except Exception as e:  # noqa: BLE001 — any per-page failure (I/O, decoding, PDFium, tesseract) is recorded
        return OcrRecord(page.page_id, checksum, "", ERROR, f"{type(e).__name__}: {e}", source)


def _text_layer(page: PageRecord, sources: _Sources) -> str | ValueError:
    """The page's text layer, or why it has none to read."""
    if page.kind != "pdf":
        return ValueError(f"page {page.page_id} is an image ({page.kind}): it has no PDF text layer")
    if not sources.unchanged(page.source):
        return ValueError(f"the source PDF {page.source} is gone or changed since ingest")
    return pdf_text(page.source, page.page)


def load_ocr(corpus_dir: str | Path) -> list[OcrRecord]:
    """Rows of ``CORPUS/ocr.parquet`` in file order (corpus order when written by ``ocr_corpus``)."""
    path = Path(corpus_dir) / OCR_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `python -m vrag_rl.retrieval.ocr {corpus_dir}` first")
    rows = pq.read_table(path).to_pylist()
    # A file written before the source column existed holds tesseract's text only.
    return [
        OcrRecord(**{k: row.get(k) for k in OCR_SCHEMA.names[:-1]}, source=row.get("source") or "ocr") for row in rows
    ]


def stale_ocr(pages: list[PageRecord], rows: list[OcrRecord]) -> dict[str, list[str]]:
    """Page ids on which the OCR rows and the page manifest disagree: ``missing`` (no row), ``changed`` (the row
    read other image bytes than the manifest's) and ``unknown`` (a row of no manifest page). Empty when current."""
    read = {r.page_id: r.checksum for r in rows}
    listed = {p.page_id for p in pages}
    out = {
        "missing": [p.page_id for p in pages if p.page_id not in read],
        "changed": [p.page_id for p in pages if p.page_id in read and read[p.page_id] != page_checksum(p)],
        "unknown": [pid for pid in read if pid not in listed],
    }
    return {k: v for k, v in out.items() if v}


def _write(records: dict[str, OcrRecord], pages: list[PageRecord], path: Path) -> None:
    rows = [records[p.page_id].__dict__ for p in pages if p.page_id in records]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=OCR_SCHEMA), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _is_done(page: PageRecord, rec: OcrRecord | None, mode: str) -> bool:
    if rec is None or rec.status != OK or mode not in (TextSource.AUTO, rec.source):
        return False
    try:  # hashing is far cheaper than OCR and catches a page image replaced under the same id
        return sha256_file(page.file) == rec.checksum
    except OSError:
        return False


def ocr_corpus(
    corpus_dir: str | Path,
    lang: str = "eng",
    progress: bool = True,
    *,
    workers: int = 2,
    cfg: OcrConfig | None = None,
    flush_every: int = 16,
    source: str = TextSource.OCR,
) -> Path:
    """The text of every page of ``corpus_dir``'s manifest into ``CORPUS/ocr.parquet`` (``source``: ``TextSource``);
    returns its path. ``cfg`` overrides the OCR settings (its ``lang`` wins over ``lang``).
    """
    if workers < 1 or flush_every < 1:
        raise ValueError(f"workers and flush_every must be >= 1, got {workers} and {flush_every}")
    mode = TextSource.parse(source, "source")
    cfg = cfg or OcrConfig(lang=lang)
    exe = "" if mode == TextSource.PDF else check_tesseract(cfg)
    corpus_dir = Path(corpus_dir)
    with writer_lock(corpus_dir, "corpus"):  # ingest writes the same folder
        return _ocr_corpus(corpus_dir, cfg, exe, mode, progress, workers, flush_every)


def _ocr_corpus(
    corpus_dir: Path, cfg: OcrConfig, exe: str, mode: str, progress: bool, workers: int, flush_every: int
) -> Path:
    pages = load_pages(corpus_dir)
    out = corpus_dir / OCR_FILE
    old = {r.page_id: r for r in load_ocr(corpus_dir)} if out.exists() else {}
    records = {p.page_id: old[p.page_id] for p in pages if _is_done(p, old.get(p.page_id), mode)}
    todo = [p for p in pages if p.page_id not in records]
    sources = _Sources(corpus_dir)
    bar = progress_bar(total=len(todo), desc=f"text ({mode})", unit="page", disable=not progress)
    pending: set[Future[OcrRecord]] = set()
    since_flush = 0
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        queue = iter(todo)
        # Keep only a few pages in flight, so Ctrl-C stops promptly and nothing piles up in memory.
        for page in queue:
            pending.add(pool.submit(_page_text, page, cfg, exe, mode, sources))
            if len(pending) < 2 * workers:
                continue
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            since_flush += _collect(done, records, bar)
            if since_flush >= flush_every:
                _write(records, pages, out)
                since_flush = 0
        done, pending = wait(pending)
        _collect(done, records, bar)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        # Keep pages finished while stopping; a future that raised (only BaseException escapes
        # _page_text) is dropped here so the write below still happens and the error propagates.
        finished = {f for f in pending if f.done() and not f.cancelled() and f.exception() is None}
        _collect(finished, records, bar)
        bar.close()
        _write(records, pages, out)
    return out


def _collect(done: set[Future[OcrRecord]], records: dict[str, OcrRecord], bar: tqdm) -> int:
    for f in done:
        rec = f.result()
        records[rec.page_id] = rec
        bar.update(1)
    return len(done)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vrag_rl.retrieval.ocr", description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", type=Path, help="corpus directory holding pages.parquet")
    ap.add_argument("--source", choices=list(TextSource), default=TextSource.OCR, help="pdf text layer, ocr, auto")
    ap.add_argument("--lang", default="eng", help="tesseract language(s), e.g. eng or eng+deu")
    ap.add_argument("--psm", type=int, default=3, help="tesseract page segmentation mode")
    ap.add_argument("--workers", type=int, default=2, help="pages OCR'd in parallel")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per page")
    ap.add_argument("--upscale-to", type=int, default=1280, help="upscale pages whose longer side is smaller")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    cfg = OcrConfig(lang=args.lang, psm=args.psm, timeout=args.timeout, upscale_to=args.upscale_to)
    try:
        path = ocr_corpus(args.corpus, progress=not args.no_progress, workers=args.workers, cfg=cfg, source=args.source)
    except (OcrError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recs = load_ocr(args.corpus)
    failed = [r for r in recs if r.status != OK]
    layer = sum(r.status == OK and r.source == TextSource.PDF for r in recs)
    print(f"{path}: {len(recs) - len(failed)} pages ok, {len(failed)} failed; {layer} read from the PDF text layer")
    for r in failed:
        print(f"  {r.page_id}: {r.status}: {r.error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
