"""The web page in a real headless Chromium: a question streams its turns and the answer with the pages it rests on,
an uploaded image is searched by, the corpus can be browsed, what cannot be answered says why, and a server with an
API key gets it from the page once asked."""

from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import expect
from serve_process import ServeProcess, serve_args

from vrag_rl.data.records import load_pages, load_qa, write_pages
from vrag_rl.http_guard import Access
from vrag_rl.retrieval.base import PageCatalog
from vrag_rl.serving.app import PUBLIC, create_app

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "runs" / "test-artifacts"  # the screenshot a run leaves behind (runs/ is not committed)

# Order in which cards were added to the page, recorded by the page itself as they arrive.
RECORD_ORDER = """
window.added = [];
new MutationObserver((ms) => ms.forEach((m) => m.addedNodes.forEach((n) => {
  if (n.classList && n.classList.contains("turn")) window.added.push("turn");
}))).observe(document.getElementById("turns"), {childList: true});
new MutationObserver(() => { if (!document.getElementById("answer").hidden) window.added.push("answer"); })
  .observe(document.getElementById("answer"), {attributes: true});
"""


@pytest.fixture
def page(browser, agent_server):
    """A tab on the served page; every request it made must have gone to the server itself."""
    context = browser.new_context(viewport={"width": 1100, "height": 1400})
    tab = context.new_page()
    requested = []
    tab.on("request", lambda request: requested.append(request.url))
    tab.goto(agent_server.url + "/")
    yield tab
    context.close()
    assert requested and all(url.startswith(agent_server.url + "/") or url.startswith("data:") for url in requested)


def inside(inner: dict, outer: dict) -> bool:
    return (
        outer["x"] - 1 <= inner["x"]
        and outer["y"] - 1 <= inner["y"]
        and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + 1
        and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + 1
    )


def loaded(locator) -> bool:
    return locator.evaluate("img => img.complete && img.naturalWidth > 0")


def test_a_question_streams_its_turns_then_the_answer_with_cited_pages(page, bundled_corpus):
    page.evaluate(RECORD_ORDER)
    page.fill("#question", load_qa(bundled_corpus)[0].question)
    page.click("#send")
    page.wait_for_selector(".answer .text", timeout=120_000)
    added = page.evaluate("window.added")
    assert added[-1] == "answer" and added.count("turn") >= 2 and added.count("answer") == 1
    assert page.locator(".turn .action").first.inner_text().startswith("search: ")
    cited = page.locator(".cite.last")
    assert cited.count() == 1 and loaded(cited.locator("img"))
    box = cited.locator(".box")
    if box.count():  # the answer was read from a crop: its box is drawn on the page
        assert box.bounding_box()["width"] > 0 and inside(box.bounding_box(), cited.locator("img").bounding_box())
        assert loaded(page.locator(".crop img").last)  # and the zoomed crop was shown in its turn
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "serve.png", full_page=True)
    cited.locator(".page").click()
    assert page.locator("#viewer").is_visible() and loaded(page.locator("#viewer-img"))
    assert page.locator("#viewer-caption").inner_text().startswith("page ")


def test_an_uploaded_image_is_searched_by(page, bundled_corpus, tmp_path):
    upload = tmp_path / "photo.png"
    with Image.open(bundled_corpus / "pages" / "doc0002_1.jpg") as im:
        im.convert("RGB").save(upload)
    page.fill("#question", "What does this page report?")
    page.set_input_files("#image", str(upload))
    page.click("#send")
    page.wait_for_selector(".answer .text", timeout=120_000)
    first = page.locator(".turn").first
    assert first.locator("h3").inner_text() == "Search by image"
    assert first.locator("figcaption").first.inner_text() == "doc0002_1"
    assert loaded(first.locator("img").first)


def test_the_corpus_can_be_browsed(page, bundled_corpus):
    page.click("#tab-corpus")
    page.wait_for_selector("#grid figure")
    assert page.locator("#grid figure").count() == 24 and page.locator("#range").inner_text() == "pages 1-24 of 24"
    page.locator("#grid .page").nth(3).click()
    assert page.locator("#viewer").is_visible()


def test_an_image_over_the_limit_is_refused_before_it_is_sent(page, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (11 << 20))
    page.fill("#question", "anything")
    page.set_input_files("#image", str(big))
    page.click("#send")
    assert page.locator("#error").inner_text().startswith("The image is 11.5 MB; the limit is 10.5 MB")
    assert page.locator(".turn").count() == 0


@pytest.fixture(scope="module")
def empty_corpus(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("empty") / "corpus"
    corpus.mkdir()
    write_pages([], corpus / "pages.parquet")
    return corpus


def not_ready_page(browser, server: ServeProcess):
    context = browser.new_context()
    tab = context.new_page()
    tab.goto(server.url + "/")
    tab.wait_for_selector("#status:not([hidden])")
    return context, tab


def test_an_empty_corpus_and_a_dead_policy_endpoint_and_search_api_are_shown(
    browser, empty_corpus, warm_policy, tiny_dirs, bundled_index, closed_port_url, tmp_path
):
    empty = ServeProcess(["--corpus", str(empty_corpus)], tmp_path / "empty.log", ready=False)
    dead_args = serve_args(warm_policy, tiny_dirs, bundled_index)
    dead_args += ["--endpoint", closed_port_url, "--endpoint-model", "m", "--processor", str(tiny_dirs["policy"])]
    dead_args += ["--search-url", closed_port_url.removesuffix("/v1")]
    dead = ServeProcess(dead_args, tmp_path / "dead.log", ready=False)
    try:
        context, tab = not_ready_page(browser, empty)
        assert "has no pages: ingest documents first" in tab.locator("#status").inner_text()
        tab.fill("#question", "anything")
        tab.click("#send")  # the refusal arrives after the request: wait for it
        expect(tab.locator("#error")).to_contain_text("The server cannot answer now: the corpus", timeout=60_000)
        context.close()
        context, tab = not_ready_page(browser, dead)
        status = tab.locator("#status").inner_text()
        assert "the policy endpoint does not answer" in status and "the search API does not answer" in status
        assert closed_port_url.removesuffix("/v1") not in status  # no address reaches a client: the log has them
        log = (tmp_path / "dead.log").read_text()
        assert f"the policy endpoint {closed_port_url} does not answer" in log
        assert f"the search API at {closed_port_url.removesuffix('/v1')} does not answer" in log
        context.close()
    finally:
        empty.stop()
        dead.stop()


def test_with_an_api_key_the_page_asks_for_it_once_and_sends_it(browser, bundled_corpus):
    """An app with a key and no policy (uvicorn on 127.0.0.1): the page asks for the key, keeps it for the tab, and
    every request it makes carries it, the page images too (fetched, then shown from blobs)."""
    from asgi_thread import serve_app

    key = "sk-page-0123456789"
    sizes = {p.page_id: (p.width, p.height, p.timestamp) for p in load_pages(bundled_corpus)}
    catalog = PageCatalog(bundled_corpus)
    app = create_app(None, catalog, sizes, "vrag-agent", lambda: "no policy here", access=Access(key, public=PUBLIC))
    with serve_app(app) as url:
        context = browser.new_context()
        tab = context.new_page()
        unauthorized = []
        tab.on("response", lambda r: unauthorized.append(r.url) if r.status == 401 else None)
        tab.goto(url + "/")
        expect(tab.locator("#key-form")).to_be_visible()
        assert unauthorized == [url + "/ready"]
        tab.fill("#key", key)
        tab.click("#key-send")
        expect(tab.locator("#status")).to_contain_text("Not ready: no policy here")
        assert tab.locator("#key-form").is_hidden()
        tab.click("#tab-corpus")
        tab.wait_for_selector("#grid figure")
        first = tab.locator("#grid img").first
        tab.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=first.element_handle())
        assert first.get_attribute("src").startswith("blob:")
        assert tab.evaluate("sessionStorage.getItem('vrag-api-key')") == key
        assert unauthorized == [url + "/ready"]  # only the first request went without it
        context.close()
