"""The reports' English: made-up names, the content pools the synthetic pages draw their facts, tables and
charts from, and that text without rendering (for training the tiny tokenizer).
"""

from __future__ import annotations

import random

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


def entity_names(seed: int, num_docs: int) -> list[str]:
    """One company name per document; the first word (the distinctive one) is unique in the corpus."""
    rng = random.Random(f"vrag-synthetic:{seed}:entities")
    cores: set[str] = set()
    names = []
    while len(names) < num_docs:
        core = _word(rng, rng.choice((2, 2, 3)))
        if core not in cores:
            cores.add(core)
            names.append(f"{core} {rng.choice(_COMPANY_SUFFIXES)}")
    return names


class Names:
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
TEXT_FACTS = (
    ("Locations", "{e} has its headquarters in {v}.", "In which city is {e} headquartered?", "city"),
    ("History", "{e} was founded in {v}.", "In which year was {e} founded?", "year"),
    ("Leadership", "The chief executive of {e} is {v}.", "Who is the chief executive of {e}?", "person"),
    ("People", "{e} employs {v} people across all of its sites.", "How many people does {e} employ?", "employees"),
    ("Products", "The best-known product of {e} is the {v}.", "What is the best-known product of {e}?", "product"),
    (
        "Research",
        "{e} runs its main research centre in {v}.",
        "In which city does {e} run its main research centre?",
        "city",
    ),
    ("Ownership", "{e} was founded by {v}.", "Who founded {e}?", "person"),
    ("Shares", "Shares of {e} trade under the ticker {v}.", "Under which ticker do shares of {e} trade?", "ticker"),
    ("Intellectual Property", "{e} holds {v} active patents.", "How many active patents does {e} hold?", "patents"),
    ("Operations", "{e} operates {v} factories.", "How many factories does {e} operate?", "factories"),
    ("Customers", "The largest customer of {e} is {v}.", "Who is the largest customer of {e}?", "company"),
    (
        "Markets",
        "{e} holds {v} percent of its home market.",
        "What percentage of its home market does {e} hold?",
        "percent",
    ),
)
TEXT_TITLES = ("Company Overview", "Operations and Ownership", "Markets and People", "Further Facts")

# (title, unit, row labels, value range, question); table columns are the four years up to the report year
# except for quarterly tables. Format keys: e, row, row_l (lower case), col, year.
TABLES = (
    (
        "Revenue by Segment",
        "million credits",
        ("Hardware", "Software", "Services", "Licensing"),
        (40, 900),
        "According to its revenue table, what was the {row_l} revenue of {e} in {col}, in million credits?",
    ),
    (
        "Headcount by Department",
        "employees at year end",
        ("Engineering", "Sales", "Support", "Research", "Operations"),
        (12, 640),
        "According to its headcount table, how many {row_l} employees did {e} have at the end of {col}?",
    ),
    (
        "Energy Use by Site and Quarter",
        "megawatt-hours",
        ("Main plant", "Warehouse", "Offices", "Test centre"),
        (100, 990),
        "According to its energy table, how many megawatt-hours did {e} use at its {row_l} in {col} {year}?",
    ),
)
QUARTERLY_TABLES = {"Energy Use by Site and Quarter"}
BARS = (
    (
        "Units Sold by Region",
        "thousand units",
        ("North", "South", "East", "West", "Central"),
        (20, 950),
        "According to its bar chart, how many thousand units did {e} sell in the {cat} region in {year}?",
    ),
    (
        "Sales by Channel",
        "million credits",
        ("Online", "Retail", "Wholesale", "Partner"),
        (15, 600),
        "According to its bar chart, what were the {cat_l} sales of {e} in {year}, in million credits?",
    ),
    (
        "Customer Satisfaction by Product",
        "score out of 100",
        None,
        (41, 99),  # None: the document's product names
        "According to its bar chart, what satisfaction score did the {cat} product of {e} receive in {year}?",
    ),
)
LINES = (
    (
        "Monthly Active Users",
        "thousands",
        (150, 990),
        "According to its line chart, how many thousand monthly active users did {e} have in {x}?",
    ),
    (
        "Average Selling Price",
        "credits",
        (40, 400),
        "According to its line chart, what was the average selling price of {e} products in {x}, in credits?",
    ),
    (
        "Carbon Emissions",
        "kilotonnes",
        (30, 700),
        "According to its line chart, how many kilotonnes of carbon did {e} emit in {x}?",
    ),
)
FILLERS = (
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
CLOSING_HEADINGS = ("Outlook", "Notes", "Further Information")


def fact_value(kind: str, rng: random.Random, names: Names) -> str:
    makers = {
        "city": names.city,
        "person": names.person,
        "product": names.product,
        "company": names.company,
        "ticker": names.ticker,
        "year": lambda: str(rng.randint(1952, 2011)),
        "employees": lambda: str(rng.randint(140, 9800)),
        "patents": lambda: str(rng.randint(12, 980)),
        "factories": lambda: str(rng.randint(2, 48)),
        "percent": lambda: str(rng.randint(3, 64)),
    }
    return makers[kind]()


def report_text(seed: int, num_docs: int) -> list[str]:
    """The English of these reports without rendering them: titles, statements, fillers and questions of
    ``num_docs`` fictional companies (names drawn apart from any corpus's), for training a tokenizer that
    knows the reports' words and splits made-up names into syllables, as a real one would."""
    rng = random.Random(f"vrag-synthetic:{seed}:tokenizer-text")
    names = Names(rng, set())
    lines = []
    for _ in range(num_docs):
        e = f"{_word(rng, rng.choice((2, 2, 3)))} {rng.choice(_COMPANY_SUFFIXES)}"
        year = rng.randint(2018, 2024)
        lines += [f"{e}: {title}" for title in TEXT_TITLES]
        for heading, statement, question, maker in TEXT_FACTS:
            value = fact_value(maker, rng, names)
            lines += [heading, statement.format(e=e, v=value), question.format(e=e), value]
        lines += [f.format(e=e) for f in FILLERS] + list(CLOSING_HEADINGS)
        for title, unit, rows, _, question in TABLES:
            row = rng.choice(rows)
            lines += [
                f"{e}: {title}",
                f"Table 1. {title} of {e}",
                f"All values in {unit}.",
                " ".join(rows),
                question.format(e=e, row=row, row_l=row.lower(), col=rng.choice(("Q2", str(year))), year=year),
            ]
        for title, unit, cats, _, question in BARS:
            cat = rng.choice(cats or (names.product().split()[0],))
            lines += [
                f"{e}: {title}, {year}",
                f"Figure 2. {title} of {e} in {year}",
                f"Values in {unit}",
                question.format(e=e, cat=cat, cat_l=cat.lower(), year=year),
            ]
        for title, unit, _, question in LINES:
            lines += [
                f"{e}: {title}",
                f"Figure 3. {title} of {e}, {year - 6}-{year}",
                f"Yearly values in {unit}",
                question.format(e=e, x=rng.randint(year - 6, year)),
            ]
        lines.append(f"{e} · Annual Report {year} · Page {rng.randint(1, 12)}")
    return lines
