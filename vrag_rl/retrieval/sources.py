"""Inputs opened as pages: PDFs rendered by PDFium, images (multi-frame TIFFs frame by frame) and videos' sampled
frames, each fitted to ``max_side`` and the page aspect limit; a bad input raises ``BadInput`` with its reason.

An opener is a context manager yielding ``Opened``: the page count, ``render(i)`` page ``i`` (0-based) as an RGB
image, each page's time in a video (None for other inputs) and a problem to report that did not stop the input.
``IngestConfig`` holds what changes a page's pixels; ``ingest`` drives the openers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pypdfium2 as pdfium
from PIL import Image, ImageOps

from vrag_rl.retrieval.video import VIDEO_SUFFIXES, FrameSampling, VideoError, VideoPages

PDF_SUFFIXES = frozenset({".pdf"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"})
_PDFIUM_ERRORS = {
    pdfium.raw.FPDF_ERR_FILE: "file not found or could not be opened",
    pdfium.raw.FPDF_ERR_FORMAT: "not in PDF format or corrupted",
    pdfium.raw.FPDF_ERR_PASSWORD: "password required or incorrect password",
    pdfium.raw.FPDF_ERR_SECURITY: "unsupported security scheme",
}
Render = Callable[[int], Image.Image]  # 0-based page index -> RGB image within max_side


class Opened(NamedTuple):
    pages: int
    render: Render
    times: list[float] | None = None  # a video's pages: their times in it, in seconds
    problem: tuple[str, str] | None = None  # (reason, detail) reported while the input's pages are kept


MAX_PAGE_ASPECT = 100  # longer side / shorter side of a stored page (see retrieval.ingest)


@dataclass(frozen=True)
class IngestConfig:
    dpi: float = 144.0
    max_side: int = 2048
    max_pages: int | None = None  # per document: the first N pages
    max_pixels: int = 89_478_485  # larger images are decompression bombs (Pillow's default limit)
    jpeg_quality: int = 90
    checkpoint_seconds: float = 30.0  # how often the manifest is rewritten during a run
    video: FrameSampling = field(default_factory=FrameSampling)  # which frames of a video become pages

    def __post_init__(self) -> None:
        if not 1 <= self.dpi <= 2400:
            raise ValueError(f"dpi must be in [1, 2400], got {self.dpi}")
        if not 16 <= self.max_side <= 65_000:  # JPEG cannot hold more than 65535 pixels a side
            raise ValueError(f"max_side must be in [16, 65000], got {self.max_side}")
        if self.max_pages is not None and self.max_pages < 1:
            raise ValueError(f"max_pages must be at least 1, got {self.max_pages}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in [1, 95], got {self.jpeg_quality}")
        if self.checkpoint_seconds < 0:
            raise ValueError(f"checkpoint_seconds must be >= 0, got {self.checkpoint_seconds}")

    def render_settings(self, video: bool = False) -> dict:
        """The settings that change a source's pages: pages made under other settings are rendered again."""
        settings = {"dpi": self.dpi, "max_side": self.max_side, "jpeg_quality": self.jpeg_quality}
        return settings | ({"video": asdict(self.video)} if video else {})


class BadInput(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def fit_page(image: Image.Image, max_side: int) -> Image.Image:
    """Scaled to ``max_side``, then padded to ``MAX_PAGE_ASPECT``."""
    w, h = image.size
    if max(w, h) > max_side:
        s = max_side / max(w, h)
        image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    w, h = image.size
    short = -(-max(w, h) // MAX_PAGE_ASPECT)  # ceil: the shortest side the ratio allows
    if min(w, h) >= short:
        return image
    padded = Image.new("RGB", (w, short) if w > h else (short, h), (255, 255, 255))
    padded.paste(image, (0, 0))
    return padded


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # Pillow's 8-bit conversion clips these modes instead of rescaling: a 16-bit scan would come out white.
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if a.max() <= 65535 else float(a.max())
        image = Image.fromarray(np.clip(a / top * 255, 0, 255).round().astype(np.uint8))
    if image.has_transparency_data:  # transparent areas become white paper, not black
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _image_error(err: Exception) -> BadInput:
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return BadInput("decompression bomb", str(err))
    if isinstance(err, OSError) and "truncated" in str(err):
        return BadInput("truncated image", str(err))
    return BadInput("corrupt image", f"{type(err).__name__}: {err}")


@contextmanager
def _pixel_guard(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb check at our limit, its warning (limit to twice the limit) made an error."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


@contextmanager
def open_image(path: Path, cfg: IngestConfig) -> Iterator[Opened]:
    # Pillow raises many exception types on malformed files; every one of them means a bad input here.
    with _pixel_guard(cfg.max_pixels):
        try:
            image = Image.open(path)
            frames = getattr(image, "n_frames", 1) if image.format == "TIFF" else 1  # other formats: frame 1
        except Exception as err:
            raise _image_error(err) from err

    def render(i: int) -> Image.Image:
        with _pixel_guard(cfg.max_pixels):
            try:
                image.seek(i)
                if image.size[0] * image.size[1] > cfg.max_pixels:  # TIFF frames are not checked by Pillow
                    raise Image.DecompressionBombError(f"frame of {image.size[0]}x{image.size[1]} pixels")
                rgb = _to_rgb(ImageOps.exif_transpose(image))  # phone photos of pages are stored rotated
            except Exception as err:
                raise _image_error(err) from err
        return fit_page(rgb, cfg.max_side)

    try:
        yield Opened(frames, render)
    finally:
        image.close()


@contextmanager
def open_video(path: Path, cfg: IngestConfig) -> Iterator[Opened]:
    try:
        video = VideoPages(path, cfg.video, lambda image: fit_page(image, cfg.max_side))
    except VideoError as err:
        raise BadInput("corrupt video", str(err)) from err

    def render(i: int) -> Image.Image:
        try:
            return video.render(i)
        except VideoError as err:
            raise BadInput("corrupt video", f"frame at {video.times[i]:.2f} s: {err}") from err

    try:
        problem = None if video.truncated is None else ("truncated video", video.truncated)
        yield Opened(len(video.times), render, video.times, problem)
    finally:
        video.close()


@contextmanager
def open_pdf(path: Path, cfg: IngestConfig) -> Iterator[Opened]:
    # PDFium's own loader, not PdfDocument(path): that one reports a 0-page PDF as a load failure with a stale
    # error code (whatever failed before, e.g. "incorrect password") and leaks the handle.
    raw = pdfium.raw.FPDF_LoadDocument(os.fsencode(path) + b"\0", None)
    if not raw:
        code = pdfium.raw.FPDF_GetLastError()
        detail = f"PDFium: {_PDFIUM_ERRORS.get(code, 'unknown error')} (code {code})"
        locked = code in (pdfium.raw.FPDF_ERR_PASSWORD, pdfium.raw.FPDF_ERR_SECURITY)
        raise BadInput("encrypted PDF" if locked else "corrupt PDF", detail)
    pdf = pdfium.PdfDocument(raw)

    def render(i: int) -> Image.Image:
        try:
            page = pdf[i]
            try:
                w, h = page.get_size()
                # ceil(side * scale) is the bitmap side; the 0.5 keeps a capped side at max_side, not one above
                scale = min(cfg.dpi / 72, (cfg.max_side - 0.5) / max(w, h))
                image = page.render(scale=scale, fill_color=(255, 255, 255, 255), draw_annots=True).to_pil()
            finally:
                page.close()
        except (pdfium.PdfiumError, ValueError, ZeroDivisionError) as err:
            raise BadInput("corrupt PDF", f"page {i + 1}: {err}") from err
        return fit_page(image.convert("RGB"), cfg.max_side)

    try:
        pdf.init_forms()  # so filled-in form fields are drawn; must precede any page access
        yield Opened(len(pdf), render)
    finally:
        pdf.close()


KINDS = {"pdf": PDF_SUFFIXES, "image": IMAGE_SUFFIXES, "video": VIDEO_SUFFIXES}  # manifest kinds by suffix
OPENERS = {"pdf": open_pdf, "image": open_image, "video": open_video}
