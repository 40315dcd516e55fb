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
from tqdm import tqdm

from vrag_rl.data.records import PageRecord, QARecord, atomic_write_bytes, page_id, sha256_hex, write_pages, write_qa
from vrag_rl.data.render import Box, PageCanvas, Word

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


# ---- names -------------------------------------------------------------------------------------------------

_ONSETS = tuple("bdfgklmnprstvz") + ("br", "dr", "kr", "st", "tr", "gl", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "o", "ei")
_CODAS = ("", "", "", "n", "r", "s", "x", "l")
_COMPANY_SUFFIXES = ("Labs", "Dynamics", "Systems", "Industries", "Foods", "Motors", "Robotics", "Textiles", "Energy")
_CUSTOMER_SUFFIXES = ("Freight", "Grocers", "Airlines", "Hospitals", "Rail", "Telecom")
_CITY_ENDINGS = ("ara", "holm", "port", "ford", "vale", "grad", "mouth", "stead")


def _word(rng: random.Random, syllables: int) -> str:
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return w.capitalize()


def entity_names(cfg: SyntheticConfig) -> list[str]:
    """One company name per document; the first word (the distinctive one) is unique in the corpus."""
    rng = random.Random(f"vrag-synthetic:{cfg.seed}:entities")
    cores: set[str] = set()
    names = []
    while len(names) < cfg.num_docs:
        core = _word(rng, rng.choice((2, 2, 3)))
        if core not in cores:
            cores.add(core)
            names.append(f"{core} {rng.choice(_COMPANY_SUFFIXES)}")
    return names


class _Names:
    """Other made-up names of a document, never reusing a company's distinctive word."""

    def __init__(self, rng: random.Random, reserved: set[str]) -> None:
        self.rng, self.reserved = rng, reserved

    def _fresh(self, syllables: int) -> str:
        while (w := _word(self.rng, syllables)) in self.reserved:
            pass
        return w

    def city(self) -> str:
        return self._fresh(self.rng.choice((1, 2))) + self.rng.choice(_CITY_ENDINGS)

    def person(self) -> str:
        return f"{self._fresh(2)} {self._fresh(self.rng.choice((2, 3)))}"

    def product(self) -> str:
        return f"{self._fresh(2)} {self.rng.choice('XKRTMV')}{self.rng.randint(2, 9)}"

    def company(self) -> str:
        return f"{self._fresh(2)} {self.rng.choice(_CUSTOMER_SUFFIXES)}"

    def ticker(self) -> str:
        return "".join(self.rng.choice("ABCDEFGHKLMNPRSTVXZ") for _ in range(self.rng.choice((3, 4))))


# ---- content pools ------------------------------------------------------------------------------------------

# (heading, statement, question, value maker); {e} is the company, {v} the answer.
_TEXT_FACTS = (
    ("Locations", "{e} has its headquarters in {v}.", "In which city is {e} headquartered?", "city"),
    ("History", "{e} was founded in {v}.", "In which year was {e} founded?", "year"),
    ("Leadership", "The chief executive of {e} is {v}.", "Who is the chief executive of {e}?", "person"),
    ("People", "{e} employs {v} people across all of its sites.", "How many people does {e} employ?", "employees"),
    ("Products", "The best-known product of {e} is the {v}.", "What is the best-known product of {e}?", "product"),
    ("Research", "{e} runs its main research centre in {v}.",
     "In which city does {e} run its main research centre?", "city"),
    ("Ownership", "{e} was founded by {v}.", "Who founded {e}?", "person"),
    ("Shares", "Shares of {e} trade under the ticker {v}.", "Under which ticker do shares of {e} trade?", "ticker"),
    ("Intellectual Property", "{e} holds {v} active patents.", "How many active patents does {e} hold?", "patents"),
    ("Operations", "{e} operates {v} factories.", "How many factories does {e} operate?", "factories"),
    ("Customers", "The largest customer of {e} is {v}.", "Who is the largest customer of {e}?", "company"),
    ("Markets", "{e} holds {v} percent of its home market.",
     "What percentage of its home market does {e} hold?", "percent"),
)
_TEXT_TITLES = ("Company Overview", "Operations and Ownership", "Markets and People", "Further Facts")

# (title, unit, row labels, value range, question); table columns are the four years up to the report year
# except for quarterly tables. Format keys: e, row, row_l (lower case), col, year.
_TABLES = (
    ("Revenue by Segment", "million credits", ("Hardware", "Software", "Services", "Licensing"), (40, 900),
     "According to its revenue table, what was the {row_l} revenue of {e} in {col}, in million credits?"),
    ("Headcount by Department", "employees at year end", ("Engineering", "Sales", "Support", "Research", "Operations"),
     (12, 640), "According to its headcount table, how many {row_l} employees did {e} have at the end of {col}?"),
    ("Energy Use by Site and Quarter", "megawatt-hours", ("Main plant", "Warehouse", "Offices", "Test centre"),
     (100, 990), "According to its energy table, how many megawatt-hours did {e} use at its {row_l} in {col} {year}?"),
)
_QUARTERLY_TABLES = {"Energy Use by Site and Quarter"}
_BARS = (
    ("Units Sold by Region", "thousand units", ("North", "South", "East", "West", "Central"), (20, 950),
     "According to its bar chart, how many thousand units did {e} sell in the {cat} region in {year}?"),
    ("Sales by Channel", "million credits", ("Online", "Retail", "Wholesale", "Partner"), (15, 600),
     "According to its bar chart, what were the {cat_l} sales of {e} in {year}, in million credits?"),
    ("Customer Satisfaction by Product", "score out of 100", None, (41, 99),  # None: the document's product names
     "According to its bar chart, what satisfaction score did the {cat} product of {e} receive in {year}?"),
)
_LINES = (
    ("Monthly Active Users", "thousands", (150, 990),
     "According to its line chart, how many thousand monthly active users did {e} have in {x}?"),
    ("Average Selling Price", "credits", (40, 400),
     "According to its line chart, what was the average selling price of {e} products in {x}, in credits?"),
    ("Carbon Emissions", "kilotonnes", (30, 700),
     "According to its line chart, how many kilotonnes of carbon did {e} emit in {x}?"),
)
_FILLERS = (
    "{e} describes the last year as a period of steady progress.",
    "Management expects demand to remain stable in the coming quarters.",
    "The company continues to invest in training and in its supplier network.",
    "Customers cite reliability and service as the main reasons to choose {e}.",
    "Several new partnerships were signed during the reporting period.",
    "The board reviewed the long-term strategy and confirmed its priorities.",
    "Quality audits at all sites were completed without major findings.",
    "{e} publishes this report every year for shareholders and staff.",
    "Work on the next generation of products is on schedule.",
    "The company remains committed to lowering its environmental footprint.",
    "Investment in automation continued at a measured pace.",
    "{e} expanded its service teams to shorten response times.",
    "Cash flow from operations covered all planned investments.",
    "The product portfolio was simplified to focus on the strongest lines.",
    "Staff turnover declined compared with the previous period.",
    "{e} intends to enter two additional markets over the next years.",
)
_CLOSING_HEADINGS = ("Outlook", "Notes", "Further Information")


def _fact_value(kind: str, rng: random.Random, names: _Names) -> str:
    makers = {
        "city": names.city, "person": names.person, "product": names.product, "company": names.company,
        "ticker": names.ticker, "year": lambda: str(rng.randint(1952, 2011)),
        "employees": lambda: str(rng.randint(140, 9800)), "patents": lambda: str(rng.randint(12, 980)),
        "factories": lambda: str(rng.randint(2, 48)), "percent": lambda: str(rng.randint(3, 64)),
    }
    return makers[kind]()


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


def report_text(seed: int, num_docs: int) -> list[str]:
    """The English of these reports without rendering them: titles, statements, fillers and questions of
    ``num_docs`` fictional companies (names drawn apart from any corpus's), for training a tokenizer that
    knows the reports' words and splits made-up names into syllables, as a real one would."""
    rng = random.Random(f"vrag-synthetic:{seed}:tokenizer-text")
    names = _Names(rng, set())
    lines = []
    for _ in range(num_docs):
        e = f"{_word(rng, rng.choice((2, 2, 3)))} {rng.choice(_COMPANY_SUFFIXES)}"
        year = rng.randint(2018, 2024)
        lines += [f"{e}: {title}" for title in _TEXT_TITLES]
        for heading, statement, question, maker in _TEXT_FACTS:
            value = _fact_value(maker, rng, names)
            lines += [heading, statement.format(e=e, v=value), question.format(e=e), value]
        lines += [f.format(e=e) for f in _FILLERS] + list(_CLOSING_HEADINGS)
        for title, unit, rows, _, question in _TABLES:
            row = rng.choice(rows)
            lines += [f"{e}: {title}", f"Table 1. {title} of {e}", f"All values in {unit}.", " ".join(rows),
                      question.format(e=e, row=row, row_l=row.lower(), col=rng.choice(("Q2", str(year))), year=year)]
        for title, unit, cats, _, question in _BARS:
            cat = rng.choice(cats or (names.product().split()[0],))
            lines += [f"{e}: {title}, {year}", f"Figure 2. {title} of {e} in {year}", f"Values in {unit}",
                      question.format(e=e, cat=cat, cat_l=cat.lower(), year=year)]
        for title, unit, _, question in _LINES:
            lines += [f"{e}: {title}", f"Figure 3. {title} of {e}, {year - 6}-{year}", f"Yearly values in {unit}",
                      question.format(e=e, x=rng.randint(year - 6, year))]
        lines.append(f"{e} · Annual Report {year} · Page {rng.randint(1, 12)}")
    return lines


# ---- pages --------------------------------------------------------------------------------------------------


def page_kinds(doc_index: int, pages_per_doc: int) -> list[str]:
    """Page 1 is text; later pages cycle through the kinds from a per-document offset, so small corpora see all."""
    return ["text"] + [_LATER_KINDS[(doc_index + k) % len(_LATER_KINDS)] for k in range(pages_per_doc - 1)]


class _DocWriter:
    """Renders the pages of one document and collects their questions."""

    def __init__(self, cfg: SyntheticConfig, doc_index: int, entity: str, reserved: set[str]) -> None:
        self.cfg, self.entity = cfg, entity
        self.rng = random.Random(f"vrag-synthetic:{cfg.seed}:doc:{doc_index}")
        self.names = _Names(self.rng, reserved)
        self.doc = f"doc{doc_index:04d}"
        self.year = self.rng.randint(2018, 2024)
        self.facts = self.rng.sample(range(len(_TEXT_FACTS)), len(_TEXT_FACTS))
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
        for heading in _CLOSING_HEADINGS:
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
        self.fillers = self.rng.sample(_FILLERS, len(_FILLERS))
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
        c.title(f"{self.entity}: {_TEXT_TITLES[nth]}")
        c.paragraph(_words(f"Annual Report {self.year}"), f=c.small_font)
        c.gap()
        qa = []
        for fact in self.facts[nth * FACTS_PER_TEXT_PAGE : (nth + 1) * FACTS_PER_TEXT_PAGE]:
            heading, statement, question, maker = _TEXT_FACTS[fact]
            value = _fact_value(maker, self.rng, self.names)
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
        title, unit, rows, (lo, hi), question = _TABLES[nth]
        quarterly = title in _QUARTERLY_TABLES
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
        title, unit, cats, (lo, hi), question = _BARS[nth]
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
        title, unit, (lo, hi), question = _LINES[nth]
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
    entities = entity_names(cfg)
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
    for sp in tqdm(generate(cfg), total=total, unit="page", desc="synthetic pages", disable=not progress):
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
