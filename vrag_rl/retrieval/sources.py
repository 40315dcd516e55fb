"""Inputs opened as pages: PDFs rendered by PDFium (in a child process, each page within a time limit: ``pdf``),
images (multi-frame TIFFs frame by frame) and videos' sampled frames, each fitted to ``max_side`` and the page aspect
limit; a bad input raises ``BadInput`` with its reason.

An opener is a context manager yielding ``Opened``: the page count, ``render(i)`` page ``i`` (0-based) as an RGB
image, each page's time in a video (None for other inputs) and a problem to report that did not stop the input. A
video's count stops at ``max_pages + 1`` sampled frames: the one past the cap says the video goes on.
``IngestConfig`` holds what changes a page's pixels and the bounds of a run; ``ingest`` drives the openers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from vrag_rl.retrieval.pdf import TIMEOUTS_PER_DOCUMENT, PdfError, PdfRenderer
from vrag_rl.retrieval.video import MAX_PIXELS, VIDEO_SUFFIXES, FrameSampling, VideoError, VideoPages, page_size

PDF_SUFFIXES = frozenset({".pdf"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"})
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
    max_pages: int = 1000  # per document: the first N pages (of a video, the first N sampled frames)
    max_pixels: int = MAX_PIXELS  # larger images and video frames are decompression bombs (Pillow's default limit)
    jpeg_quality: int = 90
    checkpoint_seconds: float = 30.0  # how often the manifest is rewritten during a run
    video: FrameSampling = field(default_factory=FrameSampling)  # which frames of a video become pages
    page_timeout_s: float = 60.0  # a PDF page not rendered within this is skipped

    def __post_init__(self) -> None:
        if not 1 <= self.dpi <= 2400:
            raise ValueError(f"dpi must be in [1, 2400], got {self.dpi}")
        if not 16 <= self.max_side <= 65_000:  # JPEG cannot hold more than 65535 pixels a side
            raise ValueError(f"max_side must be in [16, 65000], got {self.max_side}")
        if self.max_pages < 1:
            raise ValueError(f"max_pages must be at least 1, got {self.max_pages}")
        if not 0 < self.page_timeout_s <= 86_400:
            raise ValueError(f"page_timeout_s must be in (0, 86400] seconds, got {self.page_timeout_s}")
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
    size = page_size(*image.size, max_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
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
    fit = partial(fit_page, max_side=cfg.max_side)
    try:
        video = VideoPages(path, cfg.video, fit, cfg.max_side, cfg.max_pixels, max_frames=cfg.max_pages + 1)
    except VideoError as err:
        raise BadInput(err.reason, str(err)) from err

    def render(i: int) -> Image.Image:
        try:
            return video.render(i)
        except VideoError as err:
            raise BadInput(err.reason, f"frame at {video.times[i]:.2f} s: {err}") from err

    try:
        problem = None if video.truncated is None else ("truncated video", video.truncated)
        yield Opened(len(video.times), render, video.times, problem)
    finally:
        video.close()


@contextmanager
def open_pdf(path: Path, cfg: IngestConfig, renderer: PdfRenderer | None = None) -> Iterator[Opened]:
    """``renderer``: a PDFium child process shared by many documents (by default one of this document's own)."""
    own = renderer is None
    renderer = PdfRenderer(cfg.page_timeout_s) if own else renderer
    timeouts = 0

    def render(i: int) -> Image.Image:
        nonlocal timeouts
        if timeouts >= TIMEOUTS_PER_DOCUMENT:
            raise BadInput("PDF timeout", f"page {i + 1}: not tried, {timeouts} pages of this document timed out")
        try:
            image = renderer.render(i, cfg.dpi, cfg.max_side)
        except PdfError as err:
            timeouts += err.reason == "PDF timeout"
            raise BadInput(err.reason, err.detail) from err
        return fit_page(image, cfg.max_side)

    try:
        try:
            count = renderer.open(path)
        except PdfError as err:
            raise BadInput(err.reason, err.detail) from err
        yield Opened(count, render)
    finally:
        if own:
            renderer.close()


KINDS = {"pdf": PDF_SUFFIXES, "image": IMAGE_SUFFIXES, "video": VIDEO_SUFFIXES}  # manifest kinds by suffix
OPENERS = {"pdf": open_pdf, "image": open_image, "video": open_video}
