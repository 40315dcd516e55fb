"""Page images for the agent API's ``GET /pages/{id}``: a page, or a crop of it, at most ``side`` pixels a side.

A crop box is parsed as four finite numbers and intersected with the page before anything is cut (a box far larger
than its page would otherwise allocate its whole area); a bad or empty box is a 400. Whole pages are cached by size
(at most ``CACHED`` renders); crops are not (browsers cache them, and their keys are the client's to choose).
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path

from fastapi import HTTPException
from PIL import Image

MAX_SIDE = 2048
CACHED = 128  # whole-page renders kept: the web page asks for three sizes of each page it shows


def parse_box(box: str) -> tuple[float, float, float, float]:
    """``x1,y1,x2,y2`` as four finite numbers with x2 > x1 and y2 > y1, or a 400."""
    try:
        values = tuple(float(v) for v in box.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(map(math.isfinite, values)) or values[2] <= values[0] or values[3] <= values[1]:
        raise HTTPException(400, f"box must be x1,y1,x2,y2 (finite numbers) with x2 > x1 and y2 > y1, got {box[:80]!r}")
    return values


def clip_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """``box`` intersected with a ``width`` x ``height`` page, in whole pixels covering it, or a 400 if none is left."""
    x1, y1 = max(0.0, box[0]), max(0.0, box[1])
    x2, y2 = min(float(width), box[2]), min(float(height), box[3])
    if x2 <= x1 or y2 <= y1:
        raise HTTPException(400, f"box {list(box)} lies outside its page ({width}x{height})")
    return math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)


def render(path: Path, box: tuple[float, float, float, float] | None, side: int) -> bytes:
    """The page at ``path`` (or its crop, shown enlarged as the agent saw it) as a JPEG at most ``side`` a side."""
    side = max(16, min(side, MAX_SIDE))
    if box is None:
        return _whole_page(path, side)
    with Image.open(path) as im:
        region = clip_box(box, im.width, im.height)  # from the header: nothing decoded yet
        crop = im.crop(region).convert("RGB")
    scale = side / max(crop.size)
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    return _jpeg(crop.resize(size, Image.Resampling.BICUBIC))


@lru_cache(maxsize=CACHED)
def _whole_page(path: Path, side: int) -> bytes:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        return _jpeg(im)


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=88)
    return buf.getvalue()
