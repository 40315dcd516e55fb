"""Ingestion of PDFs and images into a page corpus: real PDFs (checked against poppler), every bad-input class,
resuming, interrupted runs (in-process and SIGKILL)."""

import hashlib
import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pypdfium2 as pdfium
import pytest
from PIL import Image, ImageDraw

import vrag_rl.retrieval.ingest as ingest_mod
from vrag_rl.data.records import doc_name, load_pages, sha256_file
from vrag_rl.retrieval.ingest import IngestConfig, ingest, main
from vrag_rl.retrieval.pdf import PdfError, PdfRenderer

REPO = Path(__file__).resolve().parents[2]
GNUPLOT = REPO / ".cache" / "assets" / "pdf" / "gnuplot.pdf"
FAST = IngestConfig(dpi=50, max_pages=3)


@pytest.fixture(scope="module")
def gnuplot_pdf() -> Path:
    if not GNUPLOT.is_file():
        pytest.fail(f"{GNUPLOT} is missing: run `make assets` (it extracts gnuplot.pdf from Debian's gnuplot-doc)")
    return GNUPLOT


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gray(path_or_image) -> np.ndarray:
    im = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(im.convert("L"), dtype=np.float64)


def _temp_files(root: Path) -> list[Path]:
    return [f for f in root.rglob("*") if f.name.endswith(".tmp")]


def _assert_consistent(corpus: Path) -> list:
    """Every manifest row's file exists, decodes completely, has the recorded size and checksum."""
    pages = load_pages(corpus)
    for p in pages:
        with Image.open(p.file) as im:
            im.load()
            assert im.size == (p.width, p.height) and im.mode == "RGB", p.page_id
        assert _sha(Path(p.file)) == p.checksum, p.page_id
        assert Path(p.file).name == f"{p.page_id}.jpg" == f"{p.doc}_{p.page}.jpg"
    return pages


def _picture(seed: int, size=(120, 90)) -> Image.Image:
    im = Image.new("RGB", size, (250, 250, 245))
    d = ImageDraw.Draw(im)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, size[0] - 20)), int(rng.integers(0, size[1] - 20))
        d.rectangle([x0, y0, x0 + 18, y0 + 18], fill=tuple(int(c) for c in rng.integers(0, 200, 3)))
    return im


def _save(im: Image.Image, path: Path, fmt: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)
    return path


# ---- hand-made bad files ----------------------------------------------------------------------------------

_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    s, j = list(range(256)), 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    i = j = 0
    out = bytearray()
    for b in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(b ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def _pdf(objects: list[bytes], trailer: bytes) -> bytes:
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (n, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d %s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer, xref)
    return bytes(out)


def _encrypted_pdf(user: bytes = b"secret", owner: bytes = b"owner") -> bytes:
    """A one-page PDF locked with a user password: standard security handler, revision 2 (PDF 1.7, 7.6.3)."""
    o = _rc4(hashlib.md5((owner + _PAD)[:32]).digest()[:5], (user + _PAD)[:32])
    perms, file_id = -44, b"0123456789abcdef"
    key = hashlib.md5((user + _PAD)[:32] + o + struct.pack("<i", perms) + file_id).digest()[:5]
    u = _rc4(key, _PAD)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>" % (o.hex().encode(), u.hex().encode(), perms),
    ]
    fid = file_id.hex().encode()
    return _pdf(objects, b"/Root 1 0 R /Encrypt 4 0 R /ID [<%s> <%s>]" % (fid, fid))


def _empty_pdf() -> bytes:
    buf = io.BytesIO()
    pdfium.PdfDocument.new().save(buf)  # PDFium's own writer: a valid document without pages
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG declaring a huge size: what a decompression bomb looks like before it is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _pages_pdf(contents: list[bytes], forms: list[bytes] = ()) -> bytes:
    """Letter-size pages drawing ``contents``; ``forms[k]`` is Form XObject ``/Fk``, which may draw the ones before."""

    def xobjects(count: int) -> bytes:
        return b"<< /XObject << %s >> >>" % b" ".join(b"/F%d %d 0 R" % (k, 3 + k) for k in range(count))

    def stream(content: bytes, head: bytes = b"") -> bytes:
        z = zlib.compress(content)
        return b"<< %s /Filter /FlateDecode /Length %d >>\nstream\n%s\nendstream" % (head, len(z), z)

    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]
    for k, content in enumerate(forms):
        objects.append(stream(content, b"/Type /XObject /Subtype /Form /BBox [0 0 612 792] /Resources " + xobjects(k)))
    kids = []
    for content in contents:
        objects.append(stream(content))
        page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources %s /Contents %d 0 R >>"
        objects.append(page % (xobjects(len(forms)), len(objects)))
        kids.append(b"%d 0 R" % len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(kids), len(kids))
    return _pdf(objects, b"/Root 1 0 R")


def _slow_page_forms(depth: int) -> list[bytes]:
    """Forms ``/F0`` (200 strokes) to ``/F{depth}``, each drawing the one before twice: ``/F{depth}`` makes
    200 * 2**depth strokes, minutes of PDFium's time at depth 14 (seconds at 8) in a file of a few KB."""
    lines = b"".join(b"%d %d m %d %d l S\n" % (i % 600, i % 780, i * 7 % 600, i * 13 % 780) for i in range(200))
    return [lines] + [b"/F%d Do /F%d Do" % (k, k) for k in range(depth)]


# ---- real PDF -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pdf_corpus(gnuplot_pdf, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("pdf_corpus")
    return out, ingest([gnuplot_pdf], out, FAST, progress=False)


def test_real_pdf_pages_names_sizes_and_manifest(gnuplot_pdf, pdf_corpus):
    out, result = pdf_corpus
    assert (result.pages_written, result.pages_reused, result.docs, result.problems) == (3, 0, ["gnuplot"], [])
    pages = _assert_consistent(out)
    assert [p.page_id for p in pages] == ["gnuplot_1", "gnuplot_2", "gnuplot_3"]
    assert sorted(f.name for f in (out / "pages").iterdir()) == ["gnuplot_1.jpg", "gnuplot_2.jpg", "gnuplot_3.jpg"]
    # the page size from poppler's pdfinfo (US letter, 612 x 792 points) at 50 dpi
    info = subprocess.run(["pdfinfo", str(gnuplot_pdf)], capture_output=True, text=True, check=True).stdout
    assert "612 x 792 pts" in info
    for p in pages:
        assert (p.width, p.height) == (math.ceil(612 * 50 / 72), math.ceil(792 * 50 / 72))
        assert (p.doc, p.kind, p.source) == ("gnuplot", "pdf", str(gnuplot_pdf))
    raw = pq.read_table(out / "pages.parquet").to_pylist()
    assert [r["file"] for r in raw] == [f"pages/gnuplot_{k}.jpg" for k in (1, 2, 3)]  # stored relative


def test_rendered_pages_match_poppler(gnuplot_pdf, pdf_corpus, tmp_path):
    """Page k of the corpus is page k of the PDF: compared with poppler's pdftoppm, an independent renderer."""
    out, _ = pdf_corpus
    subprocess.run(
        ["pdftoppm", "-r", "50", "-f", "1", "-l", "3", "-gray", str(gnuplot_pdf), str(tmp_path / "p")], check=True
    )
    ref = [_gray(f) for f in sorted(tmp_path.glob("p-*.pgm"))]
    assert len(ref) == 3
    ours = [_gray(out / "pages" / f"gnuplot_{k}.jpg") for k in (1, 2, 3)]
    for page in ours:
        assert page.std() > 10 and (page < 128).mean() > 0.002, "rendered page is blank"  # sparse text pages

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
        a, b = a[:h, :w] - a[:h, :w].mean(), b[:h, :w] - b[:h, :w].mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    for k, page in enumerate(ours):
        assert abs(page.shape[0] - ref[k].shape[0]) <= 1 and abs(page.shape[1] - ref[k].shape[1]) <= 1
        scores = [corr(page, r) for r in ref]
        # text at 50 dpi: anti-aliasing and JPEG differ, yet the same page correlates far above any other
        assert scores[k] > 0.6 and scores[k] > 2 * max(scores[:k] + scores[k + 1 :]), scores


def test_dpi_and_max_side(gnuplot_pdf, tmp_path):
    result = ingest([gnuplot_pdf], tmp_path, IngestConfig(dpi=300, max_side=200, max_pages=1), progress=False)
    assert result.pages_written == 1
    (p,) = _assert_consistent(tmp_path)
    assert p.height == 200 and abs(p.width - 200 * 612 / 792) <= 1  # capped, aspect kept


# ---- images ---------------------------------------------------------------------------------------------------


def test_images_become_rgb_jpeg_pages(tmp_path):
    src = tmp_path / "src"
    pics = {name: _picture(k) for k, name in enumerate(["photo", "scan", "slide", "diagram"])}
    _save(pics["photo"], src / "photo.JPG", "JPEG", quality=95)
    _save(pics["scan"], src / "sub" / "scan.bmp", "BMP")
    _save(pics["slide"], src / "slide.webp", "WEBP", lossless=True)
    _save(pics["diagram"], src / "sub" / "deeper" / "diagram.png", "PNG")
    frames = [_picture(10 + k) for k in range(3)]
    frames[0].save(src / "stack.tiff", "TIFF", save_all=True, append_images=frames[1:])
    logo = Image.new("RGBA", (60, 40), (0, 0, 0, 0))  # transparent background with one opaque red square
    ImageDraw.Draw(logo).rectangle([10, 10, 29, 29], fill=(255, 0, 0, 255))
    _save(logo, src / "logo.png", "PNG")
    deep = np.tile(np.linspace(0, 65535, 64), (32, 1)).astype(np.uint16)  # 16-bit gray ramp
    _save(Image.fromarray(deep), src / "ramp16.png", "PNG")
    _save(_picture(99, size=(1000, 500)), src / "poster.png", "PNG")
    _save(_picture(5), src / ".hidden.png", "PNG")  # hidden entries of a walked directory are not inputs
    out = tmp_path / "corpus"

    result = ingest([src], out, IngestConfig(max_side=400, checkpoint_seconds=0), progress=False)
    assert result.problems == []
    pages = {p.page_id: p for p in _assert_consistent(out)}
    assert sorted(pages) == sorted(
        ["diagram_1", "logo_1", "photo_1", "poster_1", "ramp16_1", "scan_1", "slide_1", "stack_1", "stack_2", "stack_3"]
    )
    assert all(p.kind == "image" for p in pages.values())
    assert pages["photo_1"].source == str(src / "photo.JPG")
    assert pages["diagram_1"].source == str(src / "sub" / "deeper" / "diagram.png")
    for name, pic in pics.items():
        assert np.abs(_gray(pages[f"{name}_1"].file) - _gray(pic)).mean() < 3, name
    for k, frame in enumerate(frames, 1):  # each frame is its own page, in order
        assert np.abs(_gray(pages[f"stack_{k}"].file) - _gray(frame)).mean() < 3
    logo_px = np.asarray(Image.open(pages["logo_1"].file), dtype=float)
    assert logo_px[:5, :5].min() > 240 and logo_px[15:25, 15:25, 0].mean() > 200 > logo_px[15:25, 15:25, 1].mean()
    ramp = _gray(pages["ramp16_1"].file)[16]
    assert ramp[0] < 15 and ramp[-1] > 240 and abs(ramp[32] - 130) < 15  # rescaled, not clipped to white
    assert (pages["poster_1"].width, pages["poster_1"].height) == (400, 200)

    again = ingest([src], out, IngestConfig(max_side=400), progress=False)
    assert (again.pages_written, again.pages_reused, again.problems) == (0, 10, [])


def test_sources_overlapping_the_corpus_are_refused_and_no_file_is_touched(tmp_path, capsys):
    """Scans kept in ``scans/pages``: ingesting them into ``scans`` would name the pages ``invoice_1.jpg`` beside
    the originals and then delete the originals as orphans; ingesting a corpus into itself would add its own pages
    again as new documents. Both are refused before anything is written, as is a corpus inside a source."""
    scans = tmp_path / "scans"
    _save(_picture(1), scans / "pages" / "invoice.jpg", "JPEG")
    _save(_picture(2), scans / "pages" / "receipt.jpg", "JPEG")
    before = {p: p.read_bytes() for p in scans.rglob("*") if p.is_file()}
    for sources, out, says in [
        ([scans / "pages"], scans, "is inside the corpus"),
        ([scans], scans, "is inside the corpus"),
        ([tmp_path], scans, "is inside the source"),
    ]:
        with pytest.raises(ValueError, match=says):
            ingest(sources, out, progress=False)
        assert {p: p.read_bytes() for p in scans.rglob("*") if p.is_file()} == before
    with pytest.raises(SystemExit) as exit_:
        main([str(scans / "pages"), "--out", str(scans), "--no-progress"])
    assert exit_.value.code == 2 and "is inside the corpus" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in scans.rglob("*") if p.is_file()} == before


def test_only_page_files_a_manifest_listed_are_ever_deleted(tmp_path):
    """A file of the user's in ``CORPUS/pages`` that no manifest ever listed survives every run, also one that
    drops pages; a manifest row naming a file outside ``pages/`` deletes nothing there either."""
    src = tmp_path / "src"
    for k in range(3):
        _save(_picture(k), src / f"p{k}.png", "PNG")
    out = tmp_path / "c"
    ingest([src], out, progress=False)
    mine = out / "pages" / "mine.jpg"
    _save(_picture(9), mine, "JPEG")
    (src / "p2.png").unlink()
    ingest([src], out, IngestConfig(max_pages=1), progress=False)  # p2 is no longer an input: its page stays
    assert mine.is_file() and (out / "pages" / "p2_1.jpg").is_file()
    outside = tmp_path / "precious.jpg"
    outside.write_bytes(b"not a page")
    table = pq.read_table(out / "pages.parquet")
    files = table.column("file").to_pylist()
    files[0] = "pages/../../precious.jpg"  # a hostile or damaged manifest
    pq.write_table(table.set_column(table.schema.get_field_index("file"), "file", [files]), out / "pages.parquet")
    (src / "p0.png").write_bytes((src / "p1.png").read_bytes())  # changed: its old row is dropped
    ingest([src], out, progress=False)
    assert outside.read_bytes() == b"not a page" and mine.is_file()


def test_doc_names_are_sanitized_stems():
    assert doc_name(Path("/x/My Report (final).pdf")) == "My-Report-final"
    assert doc_name(Path("a/annual_report_2023.PDF")) == "annual_report_2023"
    assert doc_name(Path("Überblick über 2024.png")) == "Überblick-über-2024"
    assert doc_name(Path("報告書 (案).pdf")) == "報告書-案"
    assert doc_name(Path("U\u0308ber.pdf")) == "Über"  # decomposed umlaut: NFC
    assert doc_name(Path("..pdf")) == "doc" and doc_name(Path("(((.png")) == "doc"


# ---- bad inputs -------------------------------------------------------------------------------------------------


def test_every_bad_input_class_is_listed_and_skipped(gnuplot_pdf, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    data = gnuplot_pdf.read_bytes()
    bad = {
        "garbage.pdf": ("corrupt PDF", b"%PDF-1.4\nthis is not a PDF at all\n"),
        "halved.pdf": ("corrupt PDF", data[: len(data) // 3]),
        "locked.pdf": ("encrypted PDF", _encrypted_pdf()),
        "nopages.pdf": ("empty PDF", _empty_pdf()),
        "zero.pdf": ("empty file", b""),
        "zero.jpg": ("empty file", b""),
        "noise.png": ("corrupt image", bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))),
        "bomb.png": ("decompression bomb", _png_header(20_000, 20_000)),  # beyond twice the limit: Pillow's error
        "bomblet.png": ("decompression bomb", _png_header(10_000, 10_000)),  # beyond the limit: Pillow's warning
        "notes.txt": ("unsupported type", b"plain text"),
        "slides.docx": ("unsupported type", b"PK\x03\x04"),
    }
    for name, (_, content) in bad.items():
        (src / name).write_bytes(content)
    buf = io.BytesIO()
    _picture(1, size=(300, 200)).save(buf, "JPEG")
    (src / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad["cut.jpg"] = ("truncated image", None)
    # the encrypted PDF is a real one: it opens with its password
    assert len(pdfium.PdfDocument(src.joinpath("locked.pdf").read_bytes(), password="secret")) == 1
    # equal names (case-insensitive): the first source in sorted order with a usable page owns the name, the
    # others are renamed, not dropped
    _save(_picture(2), src / "a" / "scan.png", "PNG")
    _save(_picture(3), src / "b" / "SCAN.webp", "WEBP")
    _save(_picture(4), src / "b" / "scan.jpg", "JPEG")
    (src / "a" / "fig.png").write_bytes(b"")  # sources without a usable page claim no name ...
    _save(_picture(5), src / "b" / "fig.png", "PNG")  # ... so this one is ingested as "fig"
    bad |= {"a/fig.png": ("empty file", None)}
    upper, lower = (
        f"{stem}-{sha256_file(src / 'b' / name)[:8]}" for stem, name in (("SCAN", "SCAN.webp"), ("scan", "scan.jpg"))
    )
    (src / "gnuplot.pdf").symlink_to(gnuplot_pdf)

    code = main(
        [
            str(src),
            str(tmp_path / "missing.pdf"),
            "--out",
            str(tmp_path / "c"),
            "--dpi",
            "40",
            "--max-pages",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "c" / "ingest_report.json").read_text())
    listed = {Path(p["source"]).relative_to(tmp_path).as_posix(): p["reason"] for p in report["problems"]}
    expected = {f"src/{name}": reason for name, (reason, _) in bad.items()} | {"missing.pdf": "not found"}
    assert listed == expected
    pages_listed = {Path(p["source"]).name: p["page"] for p in report["problems"] if p["page"] is not None}
    assert pages_listed == {"cut.jpg": 1}  # decoding fails at the page, after the file opened
    assert [(Path(r["source"]).name, r["doc"]) for r in report["renamed"]] == [
        ("SCAN.webp", upper),
        ("scan.jpg", lower),
    ]
    assert all("a/scan.png" in r["detail"] for r in report["renamed"])
    printed = capsys.readouterr().out
    missing = [(name, reason) for name, (reason, _) in bad.items() if f"{reason:<18} {src / name}" not in printed]
    assert missing == []
    # nothing else is lost
    pages = _assert_consistent(tmp_path / "c")
    assert [p.page_id for p in pages] == [f"{upper}_1", "fig_1", "gnuplot_1", "gnuplot_2", "scan_1", f"{lower}_1"]
    assert report["docs"] == ["scan", upper, "fig", lower, "gnuplot"] and report["pages_written"] == 6  # input order
    assert pages[1].source == str(src / "b" / "fig.png") and pages[-2].source == str(src / "a" / "scan.png")


def test_nothing_usable_exits_nonzero(tmp_path):
    (tmp_path / "a.pdf").write_bytes(b"")
    (tmp_path / "b.txt").write_text("x")
    cmd = [
        sys.executable,
        "-m",
        "vrag_rl.retrieval.ingest",
        str(tmp_path / "a.pdf"),
        str(tmp_path / "b.txt"),
        "--out",
        str(tmp_path / "c"),
        "--no-progress",
    ]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    assert "empty file" in run.stdout and "unsupported type" in run.stdout and "0 pages written" in run.stdout


@pytest.mark.parametrize(
    "flag",
    [["--dpi", "0"], ["--max-side", "8"], ["--max-pages", "0"], ["--jpeg-quality", "99"], ["--page-timeout", "inf"]],
)
def test_bad_options_are_usage_errors(flag, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--out", str(tmp_path / "c"), *flag])
    assert exc.value.code == 2


# ---- resume and interruption ----------------------------------------------------------------------------------


def test_resume_redoes_only_missing_or_damaged_pages(gnuplot_pdf, tmp_path):
    src = tmp_path / "src"
    _save(_picture(1), src / "photo.png", "PNG")
    sources = [gnuplot_pdf, src]
    first = ingest(sources, tmp_path / "c", FAST, progress=False)
    assert (first.pages_written, first.pages_reused) == (4, 0)
    pages_dir = tmp_path / "c" / "pages"
    stamp = {f.name: f.stat().st_mtime_ns for f in pages_dir.iterdir()}
    second = ingest(sources, tmp_path / "c", FAST, progress=False)
    assert (second.pages_written, second.pages_reused, second.problems) == (0, 4, [])
    assert {f.name: f.stat().st_mtime_ns for f in pages_dir.iterdir()} == stamp  # nothing rewritten

    good = (pages_dir / "gnuplot_3.jpg").read_bytes()
    (pages_dir / "gnuplot_1.jpg").unlink()
    (pages_dir / "gnuplot_3.jpg").write_bytes(good[:-100] + b"\0" * 100)  # damaged: checksum differs
    third = ingest(sources, tmp_path / "c", FAST, progress=False)
    assert (third.pages_written, third.pages_reused) == (2, 2)
    after = {f.name: f.stat().st_mtime_ns for f in pages_dir.iterdir()}
    assert [n for n in sorted(after) if after[n] != stamp.get(n)] == ["gnuplot_1.jpg", "gnuplot_3.jpg"]
    assert (pages_dir / "gnuplot_3.jpg").read_bytes() == good
    _assert_consistent(tmp_path / "c")

    # a changed source or changed render settings re-render that source's pages
    _save(_picture(2), src / "photo.png", "PNG")
    assert ingest(sources, tmp_path / "c", FAST, progress=False).pages_written == 1
    fourth = ingest(sources, tmp_path / "c", IngestConfig(dpi=40, max_pages=2), progress=False)
    assert (fourth.pages_written, fourth.pages_reused) == (3, 0)
    pages = _assert_consistent(tmp_path / "c")  # the page past the lowered --max-pages is gone, file and row
    assert [p.page_id for p in pages] == ["gnuplot_1", "gnuplot_2", "photo_1"]
    assert sorted(f.name for f in pages_dir.iterdir()) == ["gnuplot_1.jpg", "gnuplot_2.jpg", "photo_1.jpg"]


def test_later_runs_extend_the_corpus_and_keep_name_owners(tmp_path):
    _save(_picture(1), tmp_path / "b" / "page.png", "PNG")
    _save(_picture(2), tmp_path / "a" / "page.png", "PNG")  # sorts first, but "page" already belongs to b/
    _save(_picture(3), tmp_path / "a" / "other.png", "PNG")
    ingest([tmp_path / "b"], tmp_path / "c", progress=False)
    result = ingest([tmp_path / "a"], tmp_path / "c", progress=False)
    renamed = f"page-{sha256_file(tmp_path / 'a' / 'page.png')[:8]}"
    assert result.problems == [] and [r["doc"] for r in result.renamed] == [renamed]
    pages = _assert_consistent(tmp_path / "c")
    assert [(p.page_id, Path(p.source).parent.name) for p in pages] == [
        ("other_1", "a"),
        ("page_1", "b"),
        (f"{renamed}_1", "a"),
    ]
    again = ingest([tmp_path / "a", tmp_path / "b"], tmp_path / "c", progress=False)  # names stay as they are
    assert (again.pages_written, again.renamed[0]["doc"]) == (0, renamed)


def test_interrupted_run_leaves_no_partial_file_and_rerun_completes(gnuplot_pdf, tmp_path, monkeypatch):
    """Ctrl-C while the third page is being moved into place: temp file removed, finished pages kept."""
    real_replace, calls = os.replace, []

    def replace(src, dst):
        if str(dst).endswith(".jpg"):
            calls.append(dst)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return real_replace(src, dst)

    cfg = IngestConfig(dpi=40, max_pages=5)
    monkeypatch.setattr(ingest_mod.os, "replace", replace)  # the os module that atomic_write_bytes uses too
    with pytest.raises(KeyboardInterrupt):
        ingest([gnuplot_pdf], tmp_path, cfg, progress=False)
    monkeypatch.undo()
    assert _temp_files(tmp_path) == []
    assert sorted(f.name for f in (tmp_path / "pages").iterdir()) == ["gnuplot_1.jpg", "gnuplot_2.jpg"]
    assert [p.page_id for p in _assert_consistent(tmp_path)] == ["gnuplot_1", "gnuplot_2"]
    result = ingest([gnuplot_pdf], tmp_path, cfg, progress=False)
    assert (result.pages_written, result.pages_reused) == (3, 2)
    assert len(_assert_consistent(tmp_path)) == 5


def test_killed_run_keeps_checkpointed_pages_and_rerun_completes(gnuplot_pdf, tmp_path):
    out, n = tmp_path / "c", 40
    cmd = [
        sys.executable,
        "-m",
        "vrag_rl.retrieval.ingest",
        str(gnuplot_pdf),
        "--out",
        str(out),
        "--dpi",
        "90",
        "--max-pages",
        str(n),
        "--checkpoint-seconds",
        "0",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("pages/*.jpg"))) < 4:
            assert proc.poll() is None, f"ingest ended before it could be killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert proc.poll() is None, "ingest finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for f in out.glob("pages/*.jpg"):  # no half-written page under its final name
        with Image.open(f) as im:
            im.load()
    kept = _assert_consistent(out)  # the last checkpoint's manifest is complete and consistent
    assert 3 <= len(kept) < n
    result = ingest([gnuplot_pdf], out, IngestConfig(dpi=90, max_pages=n), progress=False)
    assert result.pages_reused >= len(kept) and result.pages_written + result.pages_reused == n
    assert len(_assert_consistent(out)) == n and _temp_files(out) == []


def test_extreme_aspect_pages_are_padded_so_processors_and_the_agent_take_them(tmp_path, embedder):
    from vrag_rl.agent.images import fit_to_budget, page_view
    from vrag_rl.models.tiny import TINY_BUDGET
    from vrag_rl.retrieval.index import MultiVectorIndex
    from vrag_rl.retrieval.sources import MAX_PAGE_ASPECT

    src = tmp_path / "src"
    strip = Image.new("RGB", (4100, 20), "white")
    ImageDraw.Draw(strip).rectangle([100, 5, 3000, 14], fill="black")
    _save(strip, src / "strip.png", "PNG")
    Image.new("RGB", (3000, 12), "gray").save(src / "band.pdf", "PDF", resolution=72)  # a 3000 x 12 pt page
    result = ingest([src], tmp_path / "corpus", IngestConfig(checkpoint_seconds=0), progress=False)
    assert result.problems == []
    pages = {p.page_id: p for p in _assert_consistent(tmp_path / "corpus")}
    assert (pages["strip_1"].width, pages["strip_1"].height) == (2048, 21)  # 2048 x 10 scaled, then padded
    assert pages["band_1"].width == 2048 and pages["band_1"].height == 21
    for p in pages.values():
        assert max(p.width, p.height) / min(p.width, p.height) <= MAX_PAGE_ASPECT
        with Image.open(p.file) as im:
            view = page_view(p.page_id, im.size, TINY_BUDGET)
            assert fit_to_budget(im, TINY_BUDGET.min_pixels, TINY_BUDGET.max_pixels).size == view.shown_size
    stored = _gray(pages["strip_1"].file)
    assert stored[3:7, 60:1400].mean() < 80 and stored[12:, :].min() > 240  # content on top, white padding below
    index = MultiVectorIndex.build(tmp_path / "index", tmp_path / "corpus", embedder, progress=False)
    assert sorted(index.page_ids) == ["band_1", "strip_1"]


def test_no_document_is_dropped_for_its_name(tmp_path):
    """CJK names, names equal but for case, and equal stems in different folders: every document is ingested
    under a name of its own, deterministically, and the renamings are reported."""
    src = tmp_path / "src"
    names = ["報告書.png", "請求書.png", "Über.png", "über.png", "2023/annual.png", "2024/annual.png"]
    for k, name in enumerate(names):
        _save(_picture(20 + k), src / name, "PNG")
    result = ingest([src], tmp_path / "c", progress=False)
    assert result.problems == []
    pages = _assert_consistent(tmp_path / "c")
    assert len(pages) == 6 and {Path(p.source).relative_to(src).as_posix() for p in pages} == set(names)
    docs = {Path(p.source).relative_to(src).as_posix(): p.doc for p in pages}
    assert docs["報告書.png"] == "報告書" and docs["請求書.png"] == "請求書" and docs["2023/annual.png"] == "annual"
    assert docs["2024/annual.png"] == f"annual-{sha256_file(src / '2024/annual.png')[:8]}"
    assert {docs["Über.png"], docs["über.png"]} == {"Über", f"über-{sha256_file(src / 'über.png')[:8]}"}
    assert sorted(r["doc"] for r in result.renamed) == sorted(d for d in docs.values() if "-" in d)
    ingest([src], tmp_path / "c2", progress=False)  # the same inputs give the same names
    assert {p.page_id for p in _assert_consistent(tmp_path / "c2")} == {p.page_id for p in pages}


def test_a_pdf_page_that_renders_too_long_is_skipped_and_the_rest_ingested(tmp_path):
    """PDFium renders in a child process: a page past --page-timeout is given up (the child killed), the pages after
    it are rendered by a fresh one, and a document whose pages keep timing out is not tried further."""
    src = tmp_path / "src"
    src.mkdir()
    slow = b"/F14 Do"
    (src / "slow.pdf").write_bytes(
        _pages_pdf([b"0 0 m 300 300 l S", slow, b"10 10 m 90 700 l S"], _slow_page_forms(14))
    )
    (src / "slower.pdf").write_bytes(_pages_pdf([slow] * 5, _slow_page_forms(14)))
    started = time.monotonic()
    assert main([str(src), "--out", str(tmp_path / "c"), "--page-timeout", "2", "--no-progress"]) == 0
    assert time.monotonic() - started < 60  # 4 timeouts of 2 s, 4 fresh children; unbounded, hours
    report = json.loads((tmp_path / "c" / "ingest_report.json").read_text())
    problems = [(Path(p["source"]).name, p["reason"], p["page"], p["detail"]) for p in report["problems"]]
    timed_out = "not done within 2 s (--page-timeout)"
    assert problems[0] == ("slow.pdf", "PDF timeout", 2, f"page 2: {timed_out}")
    assert problems[1:4] == [("slower.pdf", "PDF timeout", n, f"page {n}: {timed_out}") for n in (1, 2, 3)]
    skipped = "not tried, 3 pages of this document timed out"
    assert problems[4:] == [("slower.pdf", "PDF timeout", n, f"page {n}: {skipped}") for n in (4, 5)]
    assert [p.page_id for p in load_pages(tmp_path / "c")] == ["slow_1", "slow_3"]


def test_documents_are_capped_at_1000_pages_by_default_and_the_cap_is_reported(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "long.pdf").write_bytes(_pages_pdf([b"0 0 m 600 700 l S"] * 1001))
    assert main([str(src), "--out", str(tmp_path / "c"), "--dpi", "1", "--no-progress"]) == 0
    capped = {
        "source": str(src / "long.pdf"),
        "doc": "long",
        "detail": "the first 1000 of 1001 pages (--max-pages 1000)",
    }
    assert json.loads((tmp_path / "c" / "ingest_report.json").read_text())["capped"] == [capped]
    assert f"capped             {src / 'long.pdf'}: {capped['detail']}" in capsys.readouterr().out
    pages = load_pages(tmp_path / "c")
    assert len(pages) == 1000 and pages[-1].page_id == "long_1000"
    assert main([str(src), "--out", str(tmp_path / "c"), "--dpi", "1", "--max-pages", "1001", "--no-progress"]) == 0
    assert len(load_pages(tmp_path / "c")) == 1001


def test_a_pdfium_crash_costs_the_page_and_a_fresh_child_renders_the_next(tmp_path):
    path = tmp_path / "doc.pdf"
    path.write_bytes(_pages_pdf([b"/F14 Do", b"0 0 m 300 300 l S"], _slow_page_forms(14)))
    with PdfRenderer(timeout_s=60) as renderer:
        assert renderer.open(path) == 2
        first = renderer.pid
        threading.Timer(1.0, os.kill, (first, signal.SIGKILL)).start()  # PDFium dies mid-page
        with pytest.raises(PdfError, match=r"^corrupt PDF: page 1: PDFium crashed \(exit code -9\)$"):
            renderer.render(0, 72, 2048)
        assert renderer.render(1, 72, 2048).size == (612, 792) and renderer.pid not in (None, first)
