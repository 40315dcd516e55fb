"""Deterministic synthetic corpus of visually rich document pages with questions grounded in pixel boxes.

Every document is a short annual report about one fictional company, whose name is unique in the corpus so
a search naming it finds its pages. Pages are text (facts in paragraphs), grid tables, bar charts and line
charts; each question's answer is printed on exactly one page and its record carries the tight pixel box of
that printed answer, so the corpus serves demos, tests and expert (search, crop, answer) trajectories.

Randomness comes from ``random.Random`` instances seeded by (seed, document), so a document renders the same
whether or not the ones before it were generated, and pages stream out one at a time.

    python -m vrag_rl.data.synthetic --out DIR [--docs N] [--pages-per-doc M] [--seed S] [--width W --height H]
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image

from vrag_rl.data.records import PageRecord, QARecord, atomic_write_bytes, page_id, sha256_hex, write_pages, write_qa
from vrag_rl.data.render import Box, PageCanvas, Word
from vrag_rl.data.report_words import (
    BARS,
    CLOSING_HEADINGS,
    FILLERS,
    LINES,
    QUARTERLY_TABLES,
    TABLES,
    TEXT_FACTS,
    TEXT_TITLES,
    Names,
    entity_names,
    fact_value,
)
from vrag_rl.progress import progress_bar

GENERATOR_VERSION = 1  # bump when the same config would render different pages or records
KINDS = ("text", "table", "bar_chart", "line_chart")
_LATER_KINDS = ("table", "bar_chart", "line_chart", "text")  # page 1 is always text; the rest cycle
MAX_PAGES_PER_DOC = 12  # every kind then appears at most 3 times (text 4), within the topic pools below
FACTS_PER_TEXT_PAGE = 3
QUESTIONS_PER_DATA_PAGE = 2


@dataclass(frozen=True)
class SyntheticConfig:
    num_docs: int = 16
    pages_per_doc: int = 4
    page_size: tuple[int, int] = (800, 1100)  # (width, height) in pixels
    seed: int = 0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        def check_int(name: str, value: object, lo: int, hi: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")

        check_int("num_docs", self.num_docs, 1, 20_000)
        check_int("pages_per_doc", self.pages_per_doc, 1, MAX_PAGES_PER_DOC)
        check_int("seed", self.seed, 0, 2**63 - 1)
        check_int("jpeg_quality", self.jpeg_quality, 1, 95)
        if not isinstance(self.page_size, (tuple, list)) or len(self.page_size) != 2:
            raise ValueError(f"page_size must be (width, height), got {self.page_size!r}")
        check_int("page width", self.page_size[0], 320, 4000)
        check_int("page height", self.page_size[1], 440, 6000)
        object.__setattr__(self, "page_size", tuple(self.page_size))  # a JSON round trip gives a list

    def to_dict(self) -> dict:
        return {**asdict(self), "page_size": list(self.page_size)}

    @classmethod
    def from_dict(cls, d: dict) -> SyntheticConfig:
        return cls(**d)


@dataclass(frozen=True)
class SyntheticPage:
    record: PageRecord  # ``file`` relative to the corpus directory; ``checksum`` that of ``jpeg``
    image: Image.Image
    questions: list[QARecord]  # the questions whose answer is printed on this page
    jpeg: bytes  # the page file's content


def _words(text: str) -> list[Word]:
    return [[(w, None)] for w in text.split()]


def _statement_words(template: str, entity: str, value: str, key: str) -> list[Word]:
    """The statement's words with the value as one unbreakable, keyed segment (punctuation glued after it)."""
    before, after = template.format(e=entity, v="\0").split("\0")
    rest = after.split()
    value_word: list = [(value, key)]
    if after and not after[0].isspace():
        value_word.append((rest.pop(0), None))
    return _words(before) + [value_word] + _words(" ".join(rest))


# ---- pages --------------------------------------------------------------------------------------------------


def page_kinds(doc_index: int, pages_per_doc: int) -> list[str]:
    """Page 1 is text; later pages cycle through the kinds from a per-document offset, so small corpora see all."""
    return ["text"] + [_LATER_KINDS[(doc_index + k) % len(_LATER_KINDS)] for k in range(pages_per_doc - 1)]


class _DocWriter:
    """Renders the pages of one document and collects their questions."""

    def __init__(self, cfg: SyntheticConfig, doc_index: int, entity: str, reserved: set[str]) -> None:
        self.cfg, self.entity = cfg, entity
        self.rng = random.Random(f"vrag-synthetic:{cfg.seed}:doc:{doc_index}")
        self.names = Names(self.rng, reserved)
        self.doc = f"doc{doc_index:04d}"
        self.year = self.rng.randint(2018, 2024)
        self.facts = self.rng.sample(range(len(TEXT_FACTS)), len(TEXT_FACTS))
        self.products: list[str] = []  # product lines of the satisfaction chart: distinct bar labels
        while len(self.products) < 4:
            if (name := self.names.product().split()[0]) not in self.products:
                self.products.append(name)
        self.seen: dict[str, int] = {}
        self.fillers: list[str] = []

    def _filler(self) -> str:
        """A sentence without facts; no sentence repeats on a page."""
        return self.fillers.pop().format(e=self.entity)

    def _closing(self, c: PageCanvas) -> None:
        """Fill the rest of the page with fact-free sections, as far as they fit."""
        for heading in CLOSING_HEADINGS:
            if len(self.fillers) < 2:
                return
            words = _words(" ".join(self._filler() for _ in range(2)))
            if c.y + c.text_height(_words(heading), c.heading_font) + c.text_height(words) > c.footer_top:
                return
            c.heading(heading)
            c.paragraph(words)
            c.gap()

    def page(self, number: int, kind: str) -> SyntheticPage:
        nth = self.seen.get(kind, 0)
        self.seen[kind] = nth + 1
        canvas = PageCanvas(*self.cfg.page_size)
        pid = page_id(self.doc, number)
        draw = {"text": self._text, "table": self._table, "bar_chart": self._bar, "line_chart": self._line}[kind]
        self.fillers = self.rng.sample(FILLERS, len(FILLERS))
        qa = draw(canvas, nth, number)  # [(question, answer, box)]
        self._closing(canvas)
        canvas.footer(f"{self.entity} · Annual Report {self.year} · Page {number}")
        questions = [
            QARecord(f"{pid}_q{k}", q, a, [pid], (pid, *box), kind, self.entity, "synthetic")
            for k, (q, a, box) in enumerate(qa, 1)
        ]
        w, h = self.cfg.page_size
        jpeg = encode_jpeg(canvas.image, self.cfg.jpeg_quality)
        source = f"synthetic:seed={self.cfg.seed}"
        record = PageRecord(pid, self.doc, number, w, h, kind, f"pages/{pid}.jpg", source, sha256_hex(jpeg))
        return SyntheticPage(record, canvas.image, questions, jpeg)

    def _text(self, c: PageCanvas, nth: int, number: int) -> list[tuple[str, str, Box]]:
        c.title(f"{self.entity}: {TEXT_TITLES[nth]}")
        c.paragraph(_words(f"Annual Report {self.year}"), f=c.small_font)
        c.gap()
        qa = []
        for fact in self.facts[nth * FACTS_PER_TEXT_PAGE : (nth + 1) * FACTS_PER_TEXT_PAGE]:
            heading, statement, question, maker = TEXT_FACTS[fact]
            value = fact_value(maker, self.rng, self.names)
            words = _statement_words(statement, self.entity, value, "answer")
            fillers = [self._filler() for _ in range(self.rng.randint(1, 2))]
            at = self.rng.randint(0, len(fillers))
            full = _words(" ".join(fillers[:at])) + words + _words(" ".join(fillers[at:]))
            c.heading(heading)
            box = c.paragraph(full if c.fits(full) else words)["answer"]
            c.gap()
            qa.append((question.format(e=self.entity), value, box))
        return qa

    def _caption(self, c: PageCanvas, label: str) -> None:
        c.gap()
        caption = _words(f"{label}. Source: {self.entity} company records; figures are unaudited.")
        if c.fits(caption, c.small_font):
            c.paragraph(caption, f=c.small_font)
        c.gap()

    def _table(self, c: PageCanvas, nth: int, number: int) -> list[tuple[str, str, Box]]:
        title, unit, rows, (lo, hi), question = TABLES[nth]
        quarterly = title in QUARTERLY_TABLES
        cols = ["Q1", "Q2", "Q3", "Q4"] if quarterly else [str(self.year - 3 + k) for k in range(4)]
        cells = [[str(self.rng.randint(lo, hi)) for _ in cols] for _ in rows]
        c.title(f"{self.entity}: {title}" + (f", {self.year}" if quarterly else ""))
        c.paragraph(_words(f"All values in {unit}."), f=c.small_font)
        c.gap()
        boxes = c.table(cols, list(zip(rows, cells)))
        self._caption(c, f"Table {number}. {title} of {self.entity}")
        picks = self.rng.sample([(i, j) for i in range(len(rows)) for j in range(len(cols))], QUESTIONS_PER_DATA_PAGE)
        fmt = dict(e=self.entity, year=self.year)
        return [
            (question.format(**fmt, row_l=rows[i].lower(), col=cols[j]), cells[i][j], boxes[(i, j)]) for i, j in picks
        ]

    def _chart_height(self, c: PageCanvas) -> int:
        return round((c.footer_top - c.y) * 0.7)

    def _bar(self, c: PageCanvas, nth: int, number: int) -> list[tuple[str, str, Box]]:
        title, unit, cats, (lo, hi), question = BARS[nth]
        cats = list(cats or self.products)
        values = [self.rng.randint(lo, hi) for _ in cats]
        c.title(f"{self.entity}: {title}, {self.year}")
        c.paragraph(_words(f"Values in {unit}."), f=c.small_font)
        c.gap()
        boxes = c.bar_chart(self._chart_height(c), cats, values)
        self._caption(c, f"Figure {number}. {title} of {self.entity} in {self.year}")
        picks = self.rng.sample(range(len(cats)), QUESTIONS_PER_DATA_PAGE)
        fmt = dict(e=self.entity, year=self.year)
        return [(question.format(**fmt, cat=cats[i], cat_l=cats[i].lower()), str(values[i]), boxes[i]) for i in picks]

    def _line(self, c: PageCanvas, nth: int, number: int) -> list[tuple[str, str, Box]]:
        title, unit, (lo, hi), question = LINES[nth]
        xs = [str(self.year - 6 + k) for k in range(7)]
        values = [self.rng.randint(lo, hi)]
        for _ in xs[1:]:  # a bounded random walk looks like a real series
            step = self.rng.uniform(-0.18, 0.18) * values[-1]
            values.append(min(hi, max(lo, round(values[-1] + step))))
        c.title(f"{self.entity}: {title}")
        c.paragraph(_words(f"Yearly values in {unit}, {xs[0]}-{xs[-1]}."), f=c.small_font)
        c.gap()
        boxes = c.line_chart(self._chart_height(c), xs, values)
        self._caption(c, f"Figure {number}. {title} of {self.entity}, {xs[0]}-{xs[-1]}")
        picks = self.rng.sample(range(len(xs)), QUESTIONS_PER_DATA_PAGE)
        return [(question.format(e=self.entity, x=xs[i]), str(values[i]), boxes[i]) for i in picks]


def generate(cfg: SyntheticConfig) -> Iterator[SyntheticPage]:
    """Pages in document order, rendered one at a time."""
    entities = entity_names(cfg.seed, cfg.num_docs)
    reserved = {e.split()[0] for e in entities}
    for d, entity in enumerate(entities):
        writer = _DocWriter(cfg, d, entity, reserved)
        for number, kind in enumerate(page_kinds(d, cfg.pages_per_doc), 1):
            yield writer.page(number, kind)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # Every encoder option is explicit so a change of Pillow defaults cannot change the files.
    image.save(buf, "JPEG", quality=quality, subsampling="4:2:0", optimize=False, progressive=False)
    return buf.getvalue()


def write_corpus(out_dir: str | Path, cfg: SyntheticConfig, progress: bool = True) -> dict:
    """Write pages, ``pages.parquet``, ``qa.parquet`` and ``meta.json``; returns the metadata.

    Re-running into the directory of an interrupted run with the same config finishes it: every file is
    written through a temporary file and ``os.replace``, so page images already present are complete and kept.
    """
    out = Path(out_dir)
    (out / "pages").mkdir(parents=True, exist_ok=True)
    meta = {"generator": "vrag_rl.data.synthetic", "version": GENERATOR_VERSION, "config": cfg.to_dict()}
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in meta} != meta:
            raise ValueError(f"{out} holds a corpus made with another config or generator version")
    atomic_write_bytes(meta_path, json.dumps({**meta, "complete": False}, indent=2).encode())
    pages, questions = [], []
    total = cfg.num_docs * cfg.pages_per_doc
    for sp in progress_bar(generate(cfg), total=total, unit="page", desc="synthetic pages", disable=not progress):
        path = out / sp.record.file
        if path.exists():  # complete (written atomically) and kept: the manifest describes the file on disk
            pages.append(replace(sp.record, checksum=sha256_hex(path.read_bytes())))
        else:
            atomic_write_bytes(path, sp.jpeg)
            pages.append(sp.record)
        questions.extend(sp.questions)
    write_pages(pages, out / "pages.parquet")
    write_qa(questions, out / "qa.parquet")
    meta = {**meta, "num_pages": len(pages), "num_questions": len(questions), "complete": True}
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a synthetic page corpus with grounded questions.")
    defaults = SyntheticConfig()
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--docs", type=int, default=defaults.num_docs)
    p.add_argument("--pages-per-doc", type=int, default=defaults.pages_per_doc)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--width", type=int, default=defaults.page_size[0])
    p.add_argument("--height", type=int, default=defaults.page_size[1])
    p.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = SyntheticConfig(args.docs, args.pages_per_doc, (args.width, args.height), args.seed, args.jpeg_quality)
    except ValueError as err:
        p.error(str(err))
    meta = write_corpus(args.out, cfg, progress=not args.no_progress)
    print(f"wrote {meta['num_pages']} pages and {meta['num_questions']} questions to {args.out}")


if __name__ == "__main__":
    main()
