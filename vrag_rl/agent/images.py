"""Image budget and crop geometry for the agent's views of page images.

Every image the model sees -- a retrieved page or a crop -- is resized into a pixel budget
(``ImageBudget``, by default [256·28², 512·28²] pixels, sides multiples of 28) before encoding.
Small crops are therefore *upscaled*: that is the zoom.

Frames. The model writes ``<bbox>[x1, y1, x2, y2]</bbox>`` in absolute pixels of the image it was
shown for a given view. A ``View`` records where that image comes from: its ``region`` in the raw
page's pixel frame and the ``shown_size`` it was resized to. ``crop_region`` maps a box from the
shown frame of *that* view to the raw page frame (scale by region size / shown size, offset by the
region origin). Because every view -- whole page or crop of a crop -- stores its region in the raw
page frame, chains of crops need no composition: each crop is cut from the raw page at full
resolution, never from an already resized image.

Crop rules (``crop_region``):
- non-finite numbers or x2 <= x1 / y2 <= y1 -> invalid;
- coordinates are first held to +-``COORD_LIMIT`` (any finite number is accepted, none overflows the
  arithmetic: ``1.7e308 - -1.7e308`` would be inf, and inf * 0 NaN);
- padding is a fraction of the box's own width/height added on each side (scale-free, so it means
  the same at every zoom level);
- the box is clamped to the view (the image the model saw), not just to the page; a box with no
  positive-area overlap with the shown image -> invalid;
- the clamped raw box is rounded outward to integer pixels;
- a crop whose aspect ratio exceeds ``MAX_ASPECT_RATIO`` cannot be resized -> invalid.
Invalid boxes come back as a short reason string, which the agent loop turns into an invalid action.
"""

import math
from dataclasses import dataclass

from PIL import Image

# Qwen2.5-VL: 14-px patches merged 2x2, so image sides are multiples of 28.
FACTOR = 28
MAX_ASPECT_RATIO = 200
COORD_LIMIT = 1e12  # far outside any image; keeps box arithmetic finite for any finite coordinate


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = 256 * FACTOR * FACTOR,
    max_pixels: int = 512 * FACTOR * FACTOR,
) -> tuple[int, int]:
    """(height, width) closest to the input's aspect ratio with sides multiples of ``factor`` and
    area in [min_pixels, max_pixels] -- Qwen2.5-VL's resize rule.

    Sides are rounded to the nearest multiple (at least one factor); an area above the budget is
    scaled down by the square-root ratio and floored, one below it scaled up and ceiled. Rounding
    can leave the area slightly outside the budget when min_pixels ~ max_pixels, as in Qwen's rule.
    A downscaled side never drops below ``factor`` (qwen-vl-utils can return 0 for extreme shapes).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image sides must be positive, got height={height} width={width}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio:.1f}")
    # Python's round (half to even) on purpose: the model's processor uses the same rule.
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class ImageBudget:
    """Pixel budget every shown image (page or crop) is resized into."""

    min_pixels: int = 256 * FACTOR * FACTOR
    max_pixels: int = 512 * FACTOR * FACTOR
    factor: int = FACTOR

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if self.min_pixels < 1:
            raise ValueError(f"min_pixels must be >= 1, got {self.min_pixels}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        if self.max_pixels < self.factor * self.factor:
            raise ValueError(f"max_pixels ({self.max_pixels}) is below one factor² ({self.factor**2})")

    def shown_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of the given size is shown at."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return w, h


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent areas of scanned/rendered pages are paper: composite on white, not black.
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return image.convert("RGB")


def fit_to_budget(image: Image.Image, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> Image.Image:
    """The image as the model sees it: RGB, resized (bicubic) to ``smart_resize`` dimensions."""
    rgb = _to_rgb(image)
    height, width = smart_resize(rgb.height, rgb.width, factor, min_pixels, max_pixels)
    return rgb.resize((width, height), Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class View:
    """One image as shown to the model: which page, which region of it, at what size."""

    page_id: str
    region: tuple[float, float, float, float]  # (x0, y0, x1, y1) in the raw page's pixel frame
    shown_size: tuple[int, int]  # (width, height) of the image the model saw

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.region
        if not all(math.isfinite(v) for v in self.region) or x1 <= x0 or y1 <= y0 or x0 < 0 or y0 < 0:
            raise ValueError(f"view region must be a finite, non-negative box of positive area, got {self.region}")
        if self.shown_size[0] < 1 or self.shown_size[1] < 1:
            raise ValueError(f"shown_size must be positive, got {self.shown_size}")


def page_view(page_id: str, raw_size: tuple[int, int], budget: ImageBudget) -> View:
    """The view of a whole page of raw (width, height) ``raw_size`` shown within ``budget``."""
    width, height = raw_size
    return View(page_id, (0.0, 0.0, float(width), float(height)), budget.shown_size(width, height))


def crop_region(
    view: View, bbox: tuple[float, float, float, float], padding: float = 0.0
) -> tuple[int, int, int, int] | str:
    """Map ``bbox`` (shown frame of ``view``) to an integer (x0, y0, x1, y1) box in the raw page frame,
    or return a short reason why the box is invalid. Rules in the module docstring."""
    if not math.isfinite(padding) or padding < 0:
        raise ValueError(f"padding must be a finite fraction >= 0, got {padding}")
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        return "bbox needs four finite numbers"
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if x2 <= x1 or y2 <= y1:
        return "bbox needs x2 > x1 and y2 > y1"
    x1, y1, x2, y2 = (min(max(v, -COORD_LIMIT), COORD_LIMIT) for v in (x1, y1, x2, y2))
    pad_x, pad_y = padding * (x2 - x1), padding * (y2 - y1)
    x1, y1, x2, y2 = x1 - pad_x, y1 - pad_y, x2 + pad_x, y2 + pad_y
    shown_w, shown_h = view.shown_size
    # Clamp in the shown frame: that is exactly clamping to the view's region in the raw frame.
    cx1, cy1 = min(max(x1, 0.0), shown_w), min(max(y1, 0.0), shown_h)
    cx2, cy2 = min(max(x2, 0.0), shown_w), min(max(y2, 0.0), shown_h)
    if cx2 <= cx1 or cy2 <= cy1:
        return f"bbox lies outside the {shown_w}x{shown_h} image"
    rx0, ry0, rx1, ry1 = view.region
    sx, sy = (rx1 - rx0) / shown_w, (ry1 - ry0) / shown_h
    # Clamp again after scaling: float error must not step outside the region.
    left = math.floor(min(max(rx0 + cx1 * sx, rx0), rx1))
    top = math.floor(min(max(ry0 + cy1 * sy, ry0), ry1))
    right = math.ceil(min(max(rx0 + cx2 * sx, rx0), rx1))
    bottom = math.ceil(min(max(ry0 + cy2 * sy, ry0), ry1))
    if right <= left or bottom <= top:
        return "bbox has zero area on the page"
    width, height = right - left, bottom - top
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        return f"crop aspect ratio exceeds {MAX_ASPECT_RATIO}"
    return left, top, right, bottom


def crop_view(
    view: View,
    bbox: tuple[float, float, float, float],
    raw_page: Image.Image,
    budget: ImageBudget,
    padding: float = 0.0,
) -> tuple[View, Image.Image] | str:
    """Crop ``bbox`` (shown frame of ``view``) out of the raw page and resize it into ``budget``.

    Returns the new view (region = the raw box, so it can be cropped again) and the image to show,
    or a short reason string for an invalid box. ``raw_page`` must be the page ``view`` was made from.
    """
    box = crop_region(view, bbox, padding)
    if isinstance(box, str):
        return box
    left, top, right, bottom = box
    if right > raw_page.width or bottom > raw_page.height:
        raise ValueError(
            f"view {view.page_id} region {view.region} does not fit the given raw page of size {raw_page.size}"
        )
    shown = fit_to_budget(raw_page.crop(box), budget.min_pixels, budget.max_pixels, budget.factor)
    new_view = View(view.page_id, (float(left), float(top), float(right), float(bottom)), shown.size)
    return new_view, shown
