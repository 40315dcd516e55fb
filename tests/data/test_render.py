import math

import pytest

from vrag_rl.data.render import LayoutError, PageCanvas, nice_step


@pytest.mark.parametrize("span", [0.3, 1, 7, 10, 42, 99, 100, 101, 555, 12345])
@pytest.mark.parametrize("ticks", [3, 5, 8])
def test_nice_step_is_the_smallest_1_2_5_step_within_the_tick_count(span, ticks):
    step = nice_step(span, ticks)
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
    assert round(mantissa, 6) in (1, 2, 5)
    assert span / step <= ticks + 1e-9
    # every smaller 1/2/5 step would need more than `ticks` intervals
    smaller = {1: 0.5, 2: 1, 5: 2}[round(mantissa, 6)] * step / mantissa
    assert span / smaller > ticks


def test_paragraph_reports_boxes_of_keyed_segments_and_wraps():
    c = PageCanvas(400, 560)
    words = [[("word", None)] for _ in range(60)] + [[("Meltara", "k"), (".", None)]]
    y0 = c.y
    boxes = c.paragraph(words)
    x0, by0, x1, by1 = boxes["k"]
    assert c.margin <= x0 < x1 <= c.width - c.margin and y0 < by0 < by1 <= c.y
    assert c.y - y0 == c.text_height(words) > 3 * c.text_height([[("word", None)]])  # wrapped onto several lines


def test_content_past_the_footer_raises():
    c = PageCanvas(320, 440)
    with pytest.raises(LayoutError):
        c.paragraph([[("word", None)] for _ in range(2000)])
    with pytest.raises(LayoutError):
        PageCanvas(320, 440).paragraph([[("x" * 200, None)]])
