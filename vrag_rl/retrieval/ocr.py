"""OCR text for every page of a corpus, with the ``tesseract`` binary (Debian's tesseract-ocr).

``ocr_corpus(CORPUS)`` writes ``CORPUS/ocr.parquet``: one row per page of the manifest, in corpus
order, with columns ``page_id``, ``checksum`` (sha256 of the image bytes that were read), ``text``,
``status`` (``ok`` | ``error`` | ``timeout``) and ``error`` (a message, empty when ok). A page that
fails is recorded with empty text and the run goes on. The run is resumable: pages whose row says
``ok`` for the same image bytes are skipped, failed pages are tried again, rows of pages no longer in
the manifest are dropped. The file is rewritten atomically every ``flush_every`` pages and when
the run stops (also on Ctrl-C), so an interrupted run keeps its finished pages.

CLI: ``python -m vrag_rl.retrieval.ocr CORPUS [--lang eng] [--workers 2] [--timeout 60]``.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from vrag_rl.data.records import (
    PageRecord,
    atomic_write_bytes,
    load_pages,
    page_checksum,
    sha256_file,
    sha256_hex,
    writer_lock,
)

OCR_FILE = "ocr.parquet"
OK, ERROR, TIMEOUT = "ok", "error", "timeout"

OCR_SCHEMA = pa.schema(
    [
        ("page_id", pa.string()),
        ("checksum", pa.string()),
        ("text", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
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


def _ocr_page(page: PageRecord, cfg: OcrConfig, exe: str) -> OcrRecord:
    """Never raises for a bad page: the failure is the record's status."""
    checksum = ""
    try:
        data = Path(page.file).read_bytes()
        checksum = sha256_hex(data)
        return OcrRecord(page.page_id, checksum, ocr_image_bytes(data, cfg, exe), OK, "")
    except subprocess.TimeoutExpired:
        return OcrRecord(page.page_id, checksum, "", TIMEOUT, f"tesseract took longer than {cfg.timeout} s")
    except Exception as e:  # noqa: BLE001 — any per-page failure (I/O, decoding, tesseract) is recorded
        return OcrRecord(page.page_id, checksum, "", ERROR, f"{type(e).__name__}: {e}")


def load_ocr(corpus_dir: str | Path) -> list[OcrRecord]:
    """Rows of ``CORPUS/ocr.parquet`` in file order (corpus order when written by ``ocr_corpus``)."""
    path = Path(corpus_dir) / OCR_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `python -m vrag_rl.retrieval.ocr {corpus_dir}` first")
    return [OcrRecord(**row) for row in pq.read_table(path, schema=OCR_SCHEMA).to_pylist()]


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


def _is_done(page: PageRecord, rec: OcrRecord | None) -> bool:
    if rec is None or rec.status != OK:
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
) -> Path:
    """OCR every page of ``corpus_dir``'s manifest into ``CORPUS/ocr.parquet`` and return its path.

    ``cfg`` overrides the OCR settings (its ``lang`` wins over ``lang``).
    """
    if workers < 1 or flush_every < 1:
        raise ValueError(f"workers and flush_every must be >= 1, got {workers} and {flush_every}")
    cfg = cfg or OcrConfig(lang=lang)
    exe = check_tesseract(cfg)
    corpus_dir = Path(corpus_dir)
    with writer_lock(corpus_dir, "corpus"):  # ingest writes the same folder
        return _ocr_corpus(corpus_dir, cfg, exe, progress, workers, flush_every)


def _ocr_corpus(corpus_dir: Path, cfg: OcrConfig, exe: str, progress: bool, workers: int, flush_every: int) -> Path:
    pages = load_pages(corpus_dir)
    out = corpus_dir / OCR_FILE
    old = {r.page_id: r for r in load_ocr(corpus_dir)} if out.exists() else {}
    records = {p.page_id: old[p.page_id] for p in pages if _is_done(p, old.get(p.page_id))}
    todo = [p for p in pages if p.page_id not in records]
    bar = tqdm(total=len(todo), desc="ocr", unit="page", disable=not progress)
    pending: set[Future[OcrRecord]] = set()
    since_flush = 0
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        queue = iter(todo)
        # Keep only a few pages in flight, so Ctrl-C stops promptly and nothing piles up in memory.
        for page in queue:
            pending.add(pool.submit(_ocr_page, page, cfg, exe))
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
        # _ocr_page) is dropped here so the write below still happens and the error propagates.
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
    ap.add_argument("--lang", default="eng", help="tesseract language(s), e.g. eng or eng+deu")
    ap.add_argument("--psm", type=int, default=3, help="tesseract page segmentation mode")
    ap.add_argument("--workers", type=int, default=2, help="pages OCR'd in parallel")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per page")
    ap.add_argument("--upscale-to", type=int, default=1280, help="upscale pages whose longer side is smaller")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    cfg = OcrConfig(lang=args.lang, psm=args.psm, timeout=args.timeout, upscale_to=args.upscale_to)
    try:
        path = ocr_corpus(args.corpus, progress=not args.no_progress, workers=args.workers, cfg=cfg)
    except (OcrError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recs = load_ocr(args.corpus)
    failed = [r for r in recs if r.status != OK]
    print(f"{path}: {len(recs) - len(failed)} pages ok, {len(failed)} failed")
    for r in failed:
        print(f"  {r.page_id}: {r.status}: {r.error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
