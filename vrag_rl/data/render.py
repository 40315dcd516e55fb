"""Drawing of document pages with PIL: wrapped text, grid tables, bar and line charts.

A ``PageCanvas`` lays content out top to bottom and reports the pixel box of every piece of text that a
caller tagged with a key, so questions can point at where their answer is printed. Only Pillow's bundled
scalable font is used, so pages render the same wherever the same Pillow/FreeType build runs.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in page pixels, x1/y1 exclusive
Segment = tuple[str, Hashable | None]  # text, and the key its box is reported under (None: not reported)
Word = Sequence[Segment]  # lines break only between words, never inside one

INK = (28, 28, 32)
ACCENT = (22, 50, 112)
MUTED = (105, 105, 112)
GRID = (185, 188, 196)
HEADER_FILL = (226, 232, 243)
STRIPE_FILL = (246, 247, 250)
BAR_FILL = (72, 112, 172)
LINE_COLOR = (188, 78, 40)
WHITE = (255, 255, 255)


class LayoutError(ValueError):
    """The content does not fit the page (page too small for its fonts)."""


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    f = ImageFont.load_default(size=size)
    if not isinstance(f, ImageFont.FreeTypeFont):  # without FreeType Pillow falls back to a fixed bitmap font
        raise RuntimeError("Pillow lacks FreeType support; synthetic pages need its scalable default font")
    return f


def nice_step(span: float, ticks: int) -> float:
    """A 1/2/5 x 10^k step that divides ``span`` into at most about ``ticks`` intervals."""
    raw = max(span, 1e-9) / ticks
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= raw)


def _fmt_tick(v: float) -> str:
    return str(int(round(v)))


class PageCanvas:
    """A white page with a layout cursor; font sizes and spacing scale with the page size."""

    def __init__(self, width: int, height: int) -> None:
        self.image = Image.new("RGB", (width, height), WHITE)
        self.draw = ImageDraw.Draw(self.image)
        self.width, self.height = width, height
        s = min(width / 800, height / 1100)
        self.scale = s
        self.margin = max(16, round(56 * s))
        self.title_font = font(max(14, round(32 * s)))
        self.heading_font = font(max(11, round(21 * s)))
        self.body_font = font(max(10, round(18 * s)))
        self.small_font = font(max(9, round(14 * s)))
        self.y = self.margin
        self.footer_top = height - self.margin  # content must end above the footer rule

    @property
    def content_width(self) -> int:
        return self.width - 2 * self.margin

    def gap(self, units: float = 1.0) -> None:
        self.y += round(10 * self.scale * units) + 1

    def _line_height(self, f: ImageFont.FreeTypeFont) -> int:
        ascent, descent = f.getmetrics()
        return round((ascent + descent) * 1.3)

    def _need(self, bottom: int) -> None:
        if bottom > self.footer_top:
            raise LayoutError(f"content reaches y={bottom}, past the footer at y={self.footer_top}")

    def text_box(self, xy: tuple[int, int], text: str, f: ImageFont.FreeTypeFont, stroke: int = 0) -> Box:
        x0, y0, x1, y1 = self.draw.textbbox(xy, text, font=f, stroke_width=stroke)
        return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)

    def title(self, text: str) -> None:
        """Title with a rule under it; a 1-px stroke stands in for a bold face the bundled font lacks."""
        f = self.title_font
        self.paragraph([[(w, None)] for w in text.split()], f=f, fill=ACCENT, stroke=1)
        self.y += round(4 * self.scale)
        self.draw.line([(self.margin, self.y), (self.width - self.margin, self.y)], fill=ACCENT, width=2)
        self.gap(1.2)

    def heading(self, text: str) -> None:
        self.paragraph([[(w, None)] for w in text.split()], f=self.heading_font, fill=ACCENT)

    def _space(self, f: ImageFont.FreeTypeFont) -> float:
        # The bundled font's space is narrow; at small sizes words would run together.
        return max(3.0, self.draw.textlength(" ", font=f) * 1.2)

    def _wrap(self, words: Sequence[Word], f: ImageFont.FreeTypeFont, stroke: int) -> list[list[int]]:
        """Greedy line breaking; returns word indices per line."""
        space = self._space(f)
        lines: list[list[int]] = [[]]
        used = 0.0
        for i, word in enumerate(words):
            w = sum(self.draw.textlength(t, font=f) for t, _ in word) + 2 * stroke
            if w > self.content_width:
                raise LayoutError("a word is wider than the text column")
            extra = w if not lines[-1] else space + w
            if lines[-1] and used + extra > self.content_width:
                lines.append([])
                used, extra = 0.0, w
            lines[-1].append(i)
            used += extra
        return lines

    def text_height(self, words: Sequence[Word], f: ImageFont.FreeTypeFont | None = None) -> int:
        """The height ``paragraph(words, f)`` would take."""
        f = f or self.body_font
        return len(self._wrap(words, f, 0)) * self._line_height(f)

    def fits(self, words: Sequence[Word], f: ImageFont.FreeTypeFont | None = None) -> bool:
        return self.y + self.text_height(words, f) <= self.footer_top

    def paragraph(
        self,
        words: Sequence[Word],
        f: ImageFont.FreeTypeFont | None = None,
        fill: tuple[int, int, int] = INK,
        stroke: int = 0,
    ) -> dict[Hashable, Box]:
        """Greedy-wrapped text at the cursor; returns the boxes of keyed segments."""
        f = f or self.body_font
        line_h = self._line_height(f)
        space = self._space(f)
        lines = self._wrap(words, f, stroke)
        boxes: dict[Hashable, Box] = {}
        for line in lines:
            self._need(self.y + line_h)
            x = float(self.margin)
            for i in line:
                for text, key in words[i]:
                    xy = (round(x), self.y)
                    self.draw.text(xy, text, font=f, fill=fill, stroke_width=stroke, stroke_fill=fill)
                    if key is not None:
                        boxes[key] = self.text_box(xy, text, f, stroke)
                    x += self.draw.textlength(text, font=f)
                x += space + 2 * stroke
            self.y += line_h
        return boxes

    def table(self, header: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> dict[Hashable, Box]:
        """Grid table: a header row, a row-label column, right-aligned cells. Returns cell boxes keyed (row, col)."""
        f, hf = self.body_font, self.heading_font
        d = self.draw
        pad = max(4, round(9 * self.scale))
        asc, desc = f.getmetrics()
        row_h = asc + desc + 2 * pad
        label_w = max(d.textlength(label, font=f) for label, _ in rows) + 2 * pad
        ncols = len(header)
        col_w = (self.content_width - label_w) / ncols
        widest = max([d.textlength(h, font=hf) for h in header] + [d.textlength(c, font=f) for _, r in rows for c in r])
        if col_w < widest + 2 * pad:
            raise LayoutError("table columns are too narrow for their text")
        x0, top = self.margin, self.y
        x_cols = [x0 + label_w + j * col_w for j in range(ncols + 1)]
        bottom = top + row_h * (len(rows) + 1)
        self._need(bottom)
        d.rectangle([x0, top, self.width - self.margin, top + row_h], fill=HEADER_FILL)
        for j, h in enumerate(header):
            cx = round((x_cols[j] + x_cols[j + 1] - d.textlength(h, font=hf)) / 2)
            d.text((cx, top + pad), h, font=hf, fill=ACCENT)
        boxes: dict[Hashable, Box] = {}
        for i, (label, cells) in enumerate(rows):
            y = top + row_h * (i + 1)
            if i % 2:
                d.rectangle([x0, y, self.width - self.margin, y + row_h], fill=STRIPE_FILL)
            d.text((x0 + pad, y + pad), label, font=f, fill=INK)
            for j, cell in enumerate(cells):
                xy = (round(x_cols[j + 1] - pad - d.textlength(cell, font=f)), y + pad)
                d.text(xy, cell, font=f, fill=INK)
                boxes[(i, j)] = self.text_box(xy, cell, f)
        for k in range(len(rows) + 2):  # horizontal rules
            y = top + k * row_h
            d.line([(x0, y), (self.width - self.margin, y)], fill=INK if k in (0, 1, len(rows) + 1) else GRID)
        for x in [x0] + [round(x) for x in x_cols]:  # vertical rules
            d.line([(x, top), (x, bottom)], fill=GRID if x0 < x < self.width - self.margin else INK)
        self.y = bottom + 1
        return boxes

    def _axes(self, height: int, lo: float, hi: float, step: float, headroom: int, labels: Sequence[str]):
        """Draw y ticks, grid lines and both axes; return the plot box and a value -> y mapping."""
        f, d = self.small_font, self.draw
        top, bottom = self.y, self.y + height
        self._need(bottom)
        ticks = [lo + k * step for k in range(int(round((hi - lo) / step)) + 1)]
        gutter = max(d.textlength(_fmt_tick(t), font=f) for t in ticks) + round(10 * self.scale) + 2
        asc, desc = f.getmetrics()
        px0, px1 = self.margin + gutter, self.width - self.margin
        py0, py1 = top + headroom, bottom - (asc + desc) - round(12 * self.scale)

        def y_of(v: float) -> float:
            return py1 - (v - lo) / (hi - lo) * (py1 - py0)

        for t in ticks:
            y = round(y_of(t))
            d.line([(px0, y), (px1, y)], fill=GRID)
            tw = d.textlength(_fmt_tick(t), font=f)
            d.text((round(px0 - 6 * self.scale - 2 - tw), y - (asc + desc) // 2), _fmt_tick(t), font=f, fill=MUTED)
        d.line([(px0, py0 - headroom // 2), (px0, py1)], fill=INK, width=2)
        d.line([(px0, py1), (px1, py1)], fill=INK, width=2)
        slot = (px1 - px0) / len(labels)
        for i, label in enumerate(labels):
            lw = d.textlength(label, font=f)
            if lw > slot * 0.95:
                raise LayoutError("chart category labels overlap")
            d.text((round(px0 + (i + 0.5) * slot - lw / 2), py1 + round(6 * self.scale) + 1), label, font=f, fill=INK)
        self.y = bottom
        return (px0, py0, px1, py1), y_of, slot

    def _value_label(self, cx: float, y: float, text: str, below: bool = False) -> Box:
        """A value label centred at ``cx``, its ink ending at ``y`` (or starting there if ``below``), on a
        white patch that hides lines behind it."""
        f = self.small_font
        x = round(cx - self.draw.textlength(text, font=f) / 2)
        x0, y0, x1, y1 = self.text_box((x, 0), text, f)
        dy = round(y) - (y0 if below else y1)
        pad = max(2, round(3 * self.scale))
        self.draw.rectangle([x0 - pad, y0 + dy - pad, x1 + pad - 1, y1 + dy + pad - 1], fill=WHITE)
        self.draw.text((x, dy), text, font=f, fill=INK)
        return self.text_box((x, dy), text, f)

    def _label_headroom(self) -> int:
        asc, desc = self.small_font.getmetrics()
        return asc + desc + round(14 * self.scale) + 4

    def bar_chart(self, height: int, labels: Sequence[str], values: Sequence[int]) -> dict[Hashable, Box]:
        """Vertical bars from zero with their value printed above; returns value-label boxes keyed by index."""
        step = nice_step(max(values), 5)
        hi = math.ceil(max(values) / step) * step
        (px0, py0, px1, py1), y_of, slot = self._axes(height, 0, hi, step, self._label_headroom(), labels)
        boxes: dict[Hashable, Box] = {}
        gap = round(5 * self.scale) + 1
        for i, v in enumerate(values):
            cx = px0 + (i + 0.5) * slot
            top = round(y_of(v))
            self.draw.rectangle([round(cx - slot * 0.3), top, round(cx + slot * 0.3), py1 - 1], fill=BAR_FILL)
            boxes[i] = self._value_label(cx, top - gap, str(v))
        return boxes

    def line_chart(self, height: int, labels: Sequence[str], values: Sequence[int]) -> dict[Hashable, Box]:
        """A polyline with round markers and each value printed above its point; boxes keyed by index."""
        step = nice_step(max(max(values) - min(values), 1), 5)
        lo = math.floor(min(values) / step) * step
        hi = max(math.ceil(max(values) / step) * step, lo + step)
        (px0, py0, px1, py1), y_of, slot = self._axes(height, lo, hi, step, self._label_headroom(), labels)
        widest = max(self.draw.textlength(str(v), font=self.small_font) for v in values)
        if widest > slot * 0.8:
            raise LayoutError("line chart value labels overlap")
        pts = [(px0 + (i + 0.5) * slot, y_of(v)) for i, v in enumerate(values)]
        r = max(2, round(4 * self.scale))
        self.draw.line([(round(x), round(y)) for x, y in pts], fill=LINE_COLOR, width=max(2, round(3 * self.scale)))
        for x, y in pts:
            self.draw.ellipse([round(x) - r, round(y) - r, round(x) + r, round(y) + r], fill=LINE_COLOR)
        gap = r + round(4 * self.scale) + 2
        label_h = sum(self.small_font.getmetrics())
        boxes: dict[Hashable, Box] = {}
        for i, (v, (x, y)) in enumerate(zip(values, pts)):
            # A label above a valley would sit on both of its segments; below it, if there is room, on neither.
            neighbours = list(values[max(0, i - 1) : i]) + list(values[i + 1 : i + 2])
            below = all(n > v for n in neighbours) and y + gap + label_h < py1
            boxes[i] = self._value_label(x, y + gap if below else y - gap, str(v), below)
        return boxes

    def footer(self, text: str) -> None:
        f, d = self.small_font, self.draw
        rule_y = self.height - self.margin + round(6 * self.scale)
        d.line([(self.margin, rule_y), (self.width - self.margin, rule_y)], fill=GRID)
        d.text((self.margin, rule_y + round(6 * self.scale) + 1), text, font=f, fill=MUTED)
