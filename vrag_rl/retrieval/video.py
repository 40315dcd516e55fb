"""Video files as pages: frames sampled at a fixed interval and at scene changes, decoded with PyAV (FFmpeg).

A first pass decodes every frame to a 32x18 grey thumbnail and keeps frame ``k`` when ``interval_s`` has passed
since the last kept frame or the thumbnail differs from the last kept one by more than ``scene_change`` (mean
absolute difference, 0..1), at least ``min_gap_s`` after it (so a flicker does not keep every frame). Page ``n``
of a video is its ``n``-th kept frame (``{video}_{n}``, 1-based); its timestamp, in seconds, goes to the
manifest. Rendering decodes again and stops at the kept frames, so memory holds one frame at a time. A file
FFmpeg cannot open or decode, or one without a video stream, is a bad input (``corrupt video``), skipped and
reported like a bad PDF; one whose frames end over a second before the duration its header states (a file cut
short whose container still plays) keeps the frames it has and is reported as a ``truncated video``.

Bounds, since a file of a few hundred KB can hold frames of 100 M pixels or thousands of frames: frames are limited
to ``max_pixels`` like images: a stream whose header states more is refused before any frame is decoded
(``decompression bomb``), and FFmpeg's own ``max_pixels`` option refuses a frame past it while FFmpeg probes the
streams or when a frame grows mid-stream. A file is opened with the demuxer its suffix names (MP4/QuickTime or
Matroska/WebM), never one guessed from its bytes. Frames over 4K are decoded one at a time (FFmpeg's frame threading
keeps several in flight), and a kept frame is scaled to the page size by FFmpeg straight from its YUV planes, never
held as a full-size RGB image. Sampling stops at ``max_frames`` kept frames, so a long video (or one whose frames
are seconds apart) costs no more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEMUXERS = {".mp4": "mov", ".mov": "mov", ".mkv": "matroska", ".webm": "matroska"}
VIDEO_SUFFIXES = frozenset(DEMUXERS)
THUMB = (32, 18)
TRUNCATION_SLACK_S = 1.0  # a video whose frames end this much before its stated duration was cut short
FRAME_THREADS_MAX_PIXELS = 3840 * 2160  # frame threading (a frame per thread in flight) up to 4K frames
MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit, the default of pages too


@dataclass(frozen=True)
class FrameSampling:
    interval_s: float = 5.0  # a frame at least this often
    scene_change: float = 0.12  # and one whenever the picture changes this much (mean abs difference, 0..1)
    min_gap_s: float = 0.5  # but never two within this

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or not 0 < self.scene_change <= 1 or self.min_gap_s < 0:
            raise ValueError("video sampling: interval_s > 0, 0 < scene_change <= 1, min_gap_s >= 0")


class VideoError(Exception):
    """FFmpeg could not open or decode the file (``reason`` ``corrupt video``), or its frames are too large."""

    def __init__(self, detail: str, reason: str = "corrupt video") -> None:
        super().__init__(detail)
        self.reason = reason


def _frames(path: Path, max_pixels: int):
    import av

    # The demuxer its suffix names (one that knows its streams from the header), and FFmpeg's pixel limit on the
    # frames it decodes while probing them: a probe would decode a first frame at full size.
    limit = {"max_pixels": str(max_pixels)}
    try:
        container = av.open(str(path), format=DEMUXERS.get(path.suffix.lower()), options=limit)
    except (av.error.FFmpegError, OSError) as err:
        raise VideoError(f"FFmpeg cannot open it: {err}") from err
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > max_pixels:
        container.close()
        detail = f"frames of {width}x{height} pixels ({width * height}), over the limit of {max_pixels} (--max-pixels)"
        raise VideoError(detail, "decompression bomb")
    stream.codec_context.options = limit  # a frame growing mid-stream is not decoded
    stream.thread_type = "AUTO" if width * height <= FRAME_THREADS_MAX_PIXELS else "SLICE"

    def decode() -> Iterator:
        try:
            for frame in container.decode(stream):
                if frame.pts is not None:
                    yield frame, float(frame.pts * stream.time_base)
        except av.error.FFmpegError as err:
            raise VideoError(f"decoding failed: {err}") from err

    return container, decode()


def sample_frames(
    path: Path, sampling: FrameSampling, max_pixels: int = MAX_PIXELS, max_frames: int | None = None
) -> tuple[list[tuple[int, float]], str | None]:
    """(frame index, seconds) of the frames kept, in order, and why the video seems cut short (None if not);
    decoding stops once ``max_frames`` frames are kept."""
    container, frames = _frames(path, max_pixels)
    duration = container.duration / 1e6 if container.duration else None  # as its header says
    kept: list[tuple[int, float]] = []
    last_time, last_thumb, end = None, None, 0.0
    try:
        for k, (frame, t) in enumerate(frames):
            if len(kept) == max_frames:
                return kept, None  # stopped early: not cut short
            end = t
            thumb = frame.reformat(width=THUMB[0], height=THUMB[1], format="gray").to_ndarray().astype(np.float32)
            if last_time is not None:
                gap = t - last_time
                changed = float(np.abs(thumb - last_thumb).mean()) / 255 > sampling.scene_change
                if gap < sampling.min_gap_s or (gap < sampling.interval_s and not changed):
                    continue
            kept.append((k, t))
            last_time, last_thumb = t, thumb
    finally:
        container.close()
    short = duration is not None and end + TRUNCATION_SLACK_S < duration
    return kept, f"frames end at {end:.2f} s of the {duration:.2f} s its header gives" if short else None


def page_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``(width, height)`` scaled down to ``max_side`` on the longer side (unchanged when it fits)."""
    if max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


class VideoPages:
    """A video's kept frames: ``times`` (seconds), ``render(i)`` the ``i``-th (0-based) scaled to ``max_side`` and
    fitted by ``fit``; ``close``. ``truncated`` says why the file seems cut short: its frames are kept, and the cut
    is reported. At most ``max_frames`` frames are sampled."""

    def __init__(
        self,
        path: Path,
        sampling: FrameSampling,
        fit: Callable[[Image.Image], Image.Image],
        max_side: int,
        max_pixels: int = MAX_PIXELS,
        max_frames: int | None = None,
    ):
        self.path, self.fit, self.max_side, self.max_pixels = path, fit, max_side, max_pixels
        kept, self.truncated = sample_frames(path, sampling, max_pixels, max_frames)
        if not kept:
            raise VideoError("no frame could be decoded")
        self.indices = [k for k, _ in kept]
        self.times = [t for _, t in kept]
        self._container, self._frames, self._next = None, iter(()), 0

    def render(self, i: int) -> Image.Image:
        want = self.indices[i]
        if self._container is None or self._next > want:  # behind the wanted frame: decode from the start
            self.close()
            self._container, self._frames = _frames(self.path, self.max_pixels)
            self._next = 0
        for frame, _ in self._frames:
            self._next += 1
            if self._next - 1 == want:
                width, height = page_size(frame.width, frame.height, self.max_side)
                small = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
                return self.fit(small.to_image())
        raise VideoError(f"frame {want} is gone on the second decode")

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
