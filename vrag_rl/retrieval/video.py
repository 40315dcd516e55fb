"""Video files as pages: frames sampled at a fixed interval and at scene changes, decoded with PyAV (FFmpeg).

A first pass decodes every frame to a 32x18 grey thumbnail and keeps frame ``k`` when ``interval_s`` has passed
since the last kept frame or the thumbnail differs from the last kept one by more than ``scene_change`` (mean
absolute difference, 0..1), at least ``min_gap_s`` after it (so a flicker does not keep every frame). Page ``n``
of a video is its ``n``-th kept frame (``{video}_{n}``, 1-based); its timestamp, in seconds, goes to the
manifest. Rendering decodes again and stops at the kept frames, so memory holds one frame at a time. A file
FFmpeg cannot open or decode, or one without a video stream, is a bad input (``corrupt video``), skipped and
reported like a bad PDF; one whose frames end over a second before the duration its header states (a file cut
short whose container still plays) keeps the frames it has and is reported as a ``truncated video``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mkv", ".mov"})
THUMB = (32, 18)
TRUNCATION_SLACK_S = 1.0  # a video whose frames end this much before its stated duration was cut short


@dataclass(frozen=True)
class FrameSampling:
    interval_s: float = 5.0  # a frame at least this often
    scene_change: float = 0.12  # and one whenever the picture changes this much (mean abs difference, 0..1)
    min_gap_s: float = 0.5  # but never two within this

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or not 0 < self.scene_change <= 1 or self.min_gap_s < 0:
            raise ValueError("video sampling: interval_s > 0, 0 < scene_change <= 1, min_gap_s >= 0")


class VideoError(Exception):
    """FFmpeg could not open or decode the file."""


def _frames(path: Path):
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise VideoError(f"FFmpeg cannot open it: {err}") from err
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"

    def decode() -> Iterator:
        try:
            for frame in container.decode(stream):
                if frame.pts is not None:
                    yield frame, float(frame.pts * stream.time_base)
        except av.error.FFmpegError as err:
            raise VideoError(f"decoding failed: {err}") from err

    return container, decode()


def sample_frames(path: Path, sampling: FrameSampling) -> tuple[list[tuple[int, float]], str | None]:
    """(frame index, seconds) of the frames kept, in order, and why the video seems cut short (None if not)."""
    container, frames = _frames(path)
    duration = container.duration / 1e6 if container.duration else None  # as its header says
    kept: list[tuple[int, float]] = []
    last_time, last_thumb, end = None, None, 0.0
    try:
        for k, (frame, t) in enumerate(frames):
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


class VideoPages:
    """A video's kept frames: ``times`` (seconds), ``render(i)`` the ``i``-th (0-based) fitted by ``fit``; ``close``.
    ``truncated`` says why the file seems cut short: its frames are kept, and the cut is reported."""

    def __init__(self, path: Path, sampling: FrameSampling, fit: Callable[[Image.Image], Image.Image]):
        self.path, self.fit = path, fit
        kept, self.truncated = sample_frames(path, sampling)
        if not kept:
            raise VideoError("no frame could be decoded")
        self.indices = [k for k, _ in kept]
        self.times = [t for _, t in kept]
        self._container, self._frames, self._next = None, iter(()), 0

    def render(self, i: int) -> Image.Image:
        want = self.indices[i]
        if self._container is None or self._next > want:  # behind the wanted frame: decode from the start
            self.close()
            self._container, self._frames = _frames(self.path)
            self._next = 0
        for frame, _ in self._frames:
            self._next += 1
            if self._next - 1 == want:
                return self.fit(frame.to_image().convert("RGB"))
        raise VideoError(f"frame {want} is gone on the second decode")

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
