"""Image budget (against qwen-vl-utils as oracle) and crop geometry through chains of views."""

import math
import random

import numpy as np
import pytest
from PIL import Image
from qwen_vl_utils import fetch_image
from qwen_vl_utils.vision_process import smart_resize as qwen_smart_resize

import vrag_rl  # noqa: F401  (makes torchvision, hence qwen_vl_utils, importable on CPU torch)
from vrag_rl.agent.images import (
    MAX_ASPECT_RATIO,
    ImageBudget,
    View,
    crop_region,
    crop_view,
    fit_to_budget,
    page_view,
    smart_resize,
)

F = 28
BUDGETS = [
    (4 * F * F, 16 * F * F),
    (16 * F * F, 16 * F * F),
    (64 * F * F, 128 * F * F),
    (256 * F * F, 512 * F * F),
    (56 * 56, 28 * 28 * 1280),
]
TINY = ImageBudget(4 * F * F, 16 * F * F)


def _random_size(rng: random.Random) -> tuple[int, int]:
    """(height, width) with aspect ratio <= 200, spanning tiny to page-scan sizes."""
    h = int(math.exp(rng.uniform(0, math.log(6000))))
    ratio = math.exp(rng.uniform(-math.log(MAX_ASPECT_RATIO), math.log(MAX_ASPECT_RATIO)))
    w = min(max(1, round(h * ratio)), h * MAX_ASPECT_RATIO)
    h = min(h, w * MAX_ASPECT_RATIO)
    return h, w


# ---- smart_resize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("min_pixels,max_pixels", BUDGETS)
def test_smart_resize_matches_qwen_vl_utils(min_pixels, max_pixels):
    rng = random.Random(min_pixels * 7 + max_pixels)
    compared = 0
    for _ in range(3000):
        h, w = _random_size(rng)
        expected = qwen_smart_resize(h, w, F, min_pixels, max_pixels)
        got = smart_resize(h, w, F, min_pixels, max_pixels)
        if min(expected) == 0:
            # qwen-vl-utils floors extreme shapes to a zero side; ours keeps one factor there.
            assert got == tuple(max(F, v) for v in expected), (h, w)
            continue
        assert got == expected, (h, w, min_pixels, max_pixels)
        compared += 1
    assert compared > 1500  # tiny budgets zero out many extreme shapes in the oracle


def test_smart_resize_zero_side_guard_and_invariants():
    # qwen-vl-utils returns a zero height for this shape under a tiny budget.
    assert qwen_smart_resize(1, 200, F, 4 * F * F, 4 * F * F)[0] == 0
    assert smart_resize(1, 200, F, 4 * F * F, 4 * F * F) == (F, qwen_smart_resize(1, 200, F, 4 * F * F, 4 * F * F)[1])
    rng = random.Random(3)
    for _ in range(2000):
        h, w = _random_size(rng)
        sh, sw = smart_resize(h, w, F, 256 * F * F, 512 * F * F)
        assert sh % F == 0 and sw % F == 0 and sh >= F and sw >= F


def test_smart_resize_rejects_bad_inputs():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, MAX_ASPECT_RATIO + 1)
    smart_resize(1, MAX_ASPECT_RATIO)  # the limit itself is fine
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)
    with pytest.raises(ValueError, match="min_pixels"):
        smart_resize(100, 100, F, 10 * F * F, 5 * F * F)


def test_image_budget_validation():
    assert ImageBudget() == ImageBudget(256 * F * F, 512 * F * F, F)
    with pytest.raises(ValueError, match="must not exceed"):
        ImageBudget(min_pixels=2000, max_pixels=1000)
    with pytest.raises(ValueError, match="factor"):
        ImageBudget(factor=0)
    with pytest.raises(ValueError, match="below one factor"):
        ImageBudget(min_pixels=10, max_pixels=100)
    assert ImageBudget().shown_size(1000, 2000) == smart_resize(2000, 1000)[::-1]


# ---- fit_to_budget --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_fit_to_budget_is_pixel_identical_to_fetch_image(mode):
    rng = np.random.default_rng(len(mode))
    for i in range(12):
        h, w = (int(v) for v in rng.integers(5, 500, size=2))
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
        min_pixels, max_pixels = BUDGETS[i % 4]
        expected = fetch_image({"image": img, "min_pixels": min_pixels, "max_pixels": max_pixels})
        got = fit_to_budget(img, min_pixels, max_pixels)
        assert got.mode == "RGB" and got.size == expected.size
        assert np.array_equal(np.asarray(got), np.asarray(expected)), (mode, h, w)


def test_fit_to_budget_upscales_small_crops_and_whitens_transparency():
    small = Image.new("LA", (30, 20), (0, 0))  # fully transparent black
    shown = fit_to_budget(small, 256 * F * F, 512 * F * F)
    assert shown.width * shown.height >= 256 * F * F
    assert np.all(np.asarray(shown) == 255)


# ---- crop geometry --------------------------------------------------------------------------------


def test_page_view():
    view = page_view("doc_1", (1700, 2200), ImageBudget())
    assert view.region == (0.0, 0.0, 1700.0, 2200.0)
    assert view.shown_size == smart_resize(2200, 1700)[::-1]


def _scale_error(view: View) -> float:
    """Raw pixels per shown pixel, the larger axis."""
    rx0, ry0, rx1, ry1 = view.region
    return max((rx1 - rx0) / view.shown_size[0], (ry1 - ry0) / view.shown_size[1])


def test_round_trip_raw_box_through_shown_frame():
    rng = random.Random(11)
    for _ in range(2000):
        raw_w, raw_h = rng.randint(50, 3000), rng.randint(50, 3000)
        view = page_view("p", (raw_w, raw_h), ImageBudget())
        sx, sy = view.shown_size[0] / raw_w, view.shown_size[1] / raw_h
        x0, x1 = sorted(rng.sample(range(raw_w + 1), 2))
        y0, y1 = sorted(rng.sample(range(raw_h + 1), 2))
        if max(x1 - x0, y1 - y0) / min(x1 - x0, y1 - y0) > 100:
            continue  # too thin to crop; covered by test_extreme_aspect_crop_is_a_reason_not_an_error
        # A model that reads exact positions off the shown image.
        exact = crop_region(view, (x0 * sx, y0 * sy, x1 * sx, y1 * sy))
        assert not isinstance(exact, str)
        assert all(abs(a - b) <= 1 for a, b in zip(exact, (x0, y0, x1, y1))), (exact, (x0, y0, x1, y1))
        # A model that writes integer coordinates: half a shown pixel of error, scaled, plus the rounding.
        shown_box = (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy))
        if shown_box[2] <= shown_box[0] or shown_box[3] <= shown_box[1]:
            continue
        rounded = crop_region(view, shown_box)
        if isinstance(rounded, str):
            assert "aspect ratio" in rounded
            continue
        tolerance = 0.5 * _scale_error(view) + 1
        assert all(abs(a - b) <= tolerance for a, b in zip(rounded, (x0, y0, x1, y1)))


def test_crop_of_crop_equals_direct_crop_of_composed_box():
    rng = random.Random(5)
    budget = ImageBudget()
    checked = 0
    for _ in range(1000):
        raw_w, raw_h = rng.randint(200, 3000), rng.randint(200, 3000)
        first = page_view("p", (raw_w, raw_h), budget)
        sw, sh = first.shown_size
        box1 = (rng.uniform(0, sw * 0.6), rng.uniform(0, sh * 0.6))
        box1 = box1 + (box1[0] + rng.uniform(5, sw * 0.4), box1[1] + rng.uniform(5, sh * 0.4))
        region1 = crop_region(first, box1)
        if isinstance(region1, str):
            continue
        region1_size = (region1[2] - region1[0], region1[3] - region1[1])
        second = View("p", tuple(float(v) for v in region1), budget.shown_size(*region1_size))
        tw, th = second.shown_size
        bx0, by0 = rng.uniform(0, tw * 0.7), rng.uniform(0, th * 0.7)
        box2 = (bx0, by0, bx0 + rng.uniform(1, tw * 0.3), by0 + rng.uniform(1, th * 0.3))
        region2 = crop_region(second, box2)
        if isinstance(region2, str):
            continue
        # Compose by hand: second view's shown frame -> raw frame -> first view's shown frame.
        rx0, ry0, rx1, ry1 = second.region
        kx, ky = (rx1 - rx0) / tw, (ry1 - ry0) / th
        raw = (rx0 + box2[0] * kx, ry0 + box2[1] * ky, rx0 + box2[2] * kx, ry0 + box2[3] * ky)
        composed = (raw[0] * sw / raw_w, raw[1] * sh / raw_h, raw[2] * sw / raw_w, raw[3] * sh / raw_h)
        direct = crop_region(first, composed)
        assert not isinstance(direct, str)
        assert all(abs(a - b) <= 1 for a, b in zip(region2, direct)), (region2, direct)
        # The nested crop never leaves the region it was cut from.
        assert region1[0] <= region2[0] < region2[2] <= region1[2]
        assert region1[1] <= region2[1] < region2[3] <= region1[3]
        checked += 1
    assert checked > 800


def test_clamping_to_the_view_not_only_the_page():
    # A view of the raw region x in [100, 300), y in [200, 400), shown at 400x400 (scale 0.5).
    view = View("p", (100.0, 200.0, 300.0, 400.0), (400, 400))
    assert crop_region(view, (-1000, -50, 200, 1e9)) == (100, 200, 200, 400)
    assert crop_region(view, (0, 0, 400, 400)) == (100, 200, 300, 400)
    assert crop_region(view, (10, 10, 11, 11)) == (105, 205, 106, 206)
    # Outward rounding of a fractional raw box.
    assert crop_region(view, (1, 1, 2, 2)) == (100, 200, 101, 201)


def test_padding_is_a_fraction_of_the_box():
    view = View("p", (0.0, 0.0, 1000.0, 1000.0), (1000, 1000))
    assert crop_region(view, (400, 400, 500, 600), padding=0.1) == (390, 380, 510, 620)
    assert crop_region(view, (0, 0, 100, 100), padding=0.5) == (0, 0, 150, 150)  # clamped
    with pytest.raises(ValueError):
        crop_region(view, (0, 0, 1, 1), padding=-0.1)


@pytest.mark.parametrize(
    "bbox,fragment",
    [
        ((400, 0, 500, 100), "outside"),  # right of the shown image
        ((-100, -100, 0, 50), "outside"),  # touches the edge only: zero area after clamping
        ((0, 400, 10, 401), "outside"),
        ((10, 10, 10, 20), "x2 > x1"),
        ((10, 20, 30, 5), "x2 > x1"),
        ((math.nan, 0, 10, 10), "finite"),
        ((0, 0, math.inf, 10), "finite"),
        ((0, 0, 10), "finite"),
    ],
)
def test_invalid_boxes_give_reasons(bbox, fragment):
    view = View("p", (0.0, 0.0, 800.0, 800.0), (400, 400))
    reason = crop_region(view, bbox)
    assert isinstance(reason, str) and fragment in reason


def test_extreme_aspect_crop_is_a_reason_not_an_error():
    view = View("p", (0.0, 0.0, 1000.0, 1000.0), (1000, 1000))
    reason = crop_region(view, (0, 0, 1000, 1))
    assert isinstance(reason, str) and "aspect" in reason


def _page_with_marker(size: tuple[int, int], marker: tuple[int, int, int, int]) -> Image.Image:
    page = Image.new("RGB", size, (255, 255, 255))
    page.paste((255, 0, 0), marker)
    return page


def _red_bbox(image: Image.Image) -> tuple[int, int, int, int]:
    """Box of clearly red pixels in a shown image: what a perfect model would point at."""
    a = np.asarray(image).astype(int)
    red = (a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)
    ys, xs = np.nonzero(red)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_boxes_are_read_in_the_frame_of_the_image_shown_for_that_view():
    marker = (1400, 1700, 1460, 1740)  # raw page pixels
    raw = _page_with_marker((1700, 2200), marker)
    budget = TINY  # strong downscale of the page, strong upscale of crops
    first = page_view("p", raw.size, budget)
    shown_page = fit_to_budget(raw, budget.min_pixels, budget.max_pixels)
    assert shown_page.size == first.shown_size

    # Zoom into a squarish lower-right region (its own aspect, so its own shown size), drawn in the
    # page view's frame.
    sw, sh = first.shown_size
    zoom = crop_view(first, (sw * 0.6, sh * 0.6, sw, sh * 0.9), raw, budget)
    assert not isinstance(zoom, str)
    second, shown_zoom = zoom
    assert shown_zoom.size == second.shown_size != first.shown_size

    # The model points at the marker in the zoomed image: coordinates in the zoomed image's frame.
    target = _red_bbox(shown_zoom)
    final = crop_view(second, target, raw, budget)
    assert not isinstance(final, str)
    third, shown_final = final
    # Resampling blurs the marker's edge by up to a shown pixel of the zoomed view.
    tolerance = _scale_error(second) + 1
    assert tolerance < 10  # the test means something only if the zoom is strong
    assert all(abs(a - b) <= tolerance for a, b in zip(third.region, marker)), (third.region, marker)
    assert np.mean(np.asarray(shown_final)[..., 1] < 60) > 0.8  # the crop is mostly marker

    # The same numbers read in the page view's frame point somewhere else entirely.
    elsewhere = crop_region(first, target)
    assert isinstance(elsewhere, str) or elsewhere[0] < marker[0] - 100


def test_crop_view_cuts_the_raw_page_and_fits_the_budget():
    raw = Image.fromarray(np.random.default_rng(0).integers(0, 256, (900, 700, 3), dtype=np.uint8))
    budget = TINY
    view = page_view("p", raw.size, budget)
    result = crop_view(view, (10, 20, 50, 60), raw, budget, padding=0.25)
    assert not isinstance(result, str)
    new_view, shown = result
    box = crop_region(view, (10, 20, 50, 60), padding=0.25)
    assert new_view.region == tuple(float(v) for v in box)
    expected = fit_to_budget(raw.crop(box), budget.min_pixels, budget.max_pixels)
    assert np.array_equal(np.asarray(shown), np.asarray(expected))
    outside = crop_view(view, (-10, -10, 0, 0), raw, budget)
    assert outside == "bbox lies outside the {}x{} image".format(*view.shown_size)
    with pytest.raises(ValueError, match="does not fit"):
        crop_view(view, (0, 0, view.shown_size[0], view.shown_size[1]), raw.crop((0, 0, 100, 100)), budget)


def test_view_validation():
    with pytest.raises(ValueError):
        View("p", (10.0, 0.0, 10.0, 5.0), (28, 28))
    with pytest.raises(ValueError):
        View("p", (0.0, 0.0, 10.0, 5.0), (0, 28))
    with pytest.raises(ValueError):
        View("p", (0.0, 0.0, math.nan, 5.0), (28, 28))
