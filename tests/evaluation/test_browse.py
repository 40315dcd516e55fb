"""The browsing page of an evaluation (``evaluation.browse``) under a manifest it cannot trust: page ids that are
markup or paths are escaped and never become file names outside ``OUT``, and a page whose file lies outside the
corpus (a symlink) is not shown."""

import dataclasses
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

from vrag_rl.data.records import load_pages, write_pages
from vrag_rl.evaluation.browse import write_browser

MARKUP = "x'><img src=x onerror=alert(1)>_1"
CLIMB = "../../climb_1"


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_page_ids_are_escaped_and_only_corpus_files_are_shown(bundled_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(bundled_corpus / "pages", corpus / "pages")
    pages = [dataclasses.replace(p, file=f"pages/{p.page_id}.jpg") for p in load_pages(bundled_corpus)[:2]]
    (tmp_path / "secret.jpg").write_bytes((corpus / "pages" / "doc0001_1.jpg").read_bytes())
    os.symlink(tmp_path / "secret.jpg", corpus / "pages" / "linked_1.jpg")
    hostile = [
        dataclasses.replace(pages[0], page_id=MARKUP),
        dataclasses.replace(pages[1], page_id=CLIMB),
        dataclasses.replace(pages[1], page_id="linked_1", file="pages/linked_1.jpg"),
    ]
    write_pages(pages + hostile, corpus / "pages.parquet")
    views = [[0, MARKUP, None], [0, CLIMB, [0, 0, 10, 10]], [0, "linked_1", None], [0, pages[0].page_id, None]]
    row = {
        "qid": "q<1>",
        "data_source": "synthetic",
        "category": "",
        "question": "<script>alert(2)</script>",
        "reference": "x",
        "gold_pages": [MARKUP],
        "retrieval": {"ndcg@10": 0.0},
        "trajectory": {"texts": ["<search>x</search>"], "actions": [{"kind": "search"}], "views": views},
    }
    out = tmp_path / "out"
    html = write_browser([row], corpus, out, "browse").read_text()
    parser = Tags()
    parser.feed(html)
    assert {tag for tag, _ in parser.tags} <= {"meta", "title", "style", "h1", "p", "label", "input", "span",
                                              "section", "h2", "br", "b", "div", "pre", "figure", "img",
                                              "figcaption", "script"}  # fmt: skip
    assert sum(tag == "script" for tag, _ in parser.tags) == 1  # the page's own filter script only
    images = [attrs for tag, attrs in parser.tags if tag == "img"]
    assert [a["alt"] for a in images] == [MARKUP, CLIMB, pages[0].page_id]  # the linked page is not shown
    assert all(set(a) == {"src", "alt"} for a in images)
    for a in images:
        thumb = (out / a["src"]).resolve()
        assert thumb.is_relative_to((out / "pages").resolve()) and thumb.is_file()
    assert "linked_1 (not in the corpus)" in html
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert {p for p in written if not p.is_relative_to(out) and not p.is_relative_to(corpus)} == {
        tmp_path / "secret.jpg"
    }
    assert not Path(out / "pages" / "linked_1.jpg").exists()
