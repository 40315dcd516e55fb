"""The HTTP search API, against a running uvicorn on 127.0.0.1: contract, modes, pages, validation, traversal."""

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from asgi_thread import request_in_flight, serve_app
from PIL import Image

from vrag_rl.data.records import load_pages, write_pages
from vrag_rl.http_guard import Access
from vrag_rl.retrieval.api import Limits, create_app
from vrag_rl.retrieval.client import SearchClient
from vrag_rl.retrieval.index import MultiVectorIndex
from vrag_rl.retrieval.local import LocalRetriever
from vrag_rl.retrieval.ocr import OCR_FILE, OCR_SCHEMA

LIMITS = Limits(
    max_batch=8,
    max_query_chars=200,
    max_top_k=20,
    max_image_bytes=300_000,
    max_image_pixels=4_000_000,
    max_body_bytes=1_000_000,
)
QUERIES = ["annual revenue table", "Lagas Dynamics research centre", "word4 odd"]


@pytest.fixture(scope="module")
def corpus(bundled_corpus, tmp_path_factory) -> Path:
    """The bundled corpus, known OCR texts, and a manifest page whose file is symlinked out of the corpus (a manifest
    row naming a path outside is refused whole: data/test_records.py)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("api")
    secret = (bundled_corpus / "pages" / "doc0001_1.jpg").read_bytes()
    (root / "secret.jpg").write_bytes(secret)
    out = root / "corpus"
    shutil.copytree(bundled_corpus, out)
    pages = [dataclasses.replace(p, file=str(Path(p.file).relative_to(out))) for p in load_pages(out)]
    os.symlink(root / "secret.jpg", out / "pages" / "evil_1.jpg")
    evil = dataclasses.replace(pages[0], doc="evil", checksum=hashlib.sha256(secret).hexdigest())
    evil = [
        dataclasses.replace(evil, page_id="evil_1", file="pages/evil_1.jpg"),
    ]
    write_pages(pages + evil, out / "pages.parquet")
    texts = [f"word{i} {'even' if i % 2 == 0 else 'odd'}" for i in range(len(pages))]
    read = {p.page_id: p.checksum for p in load_pages(out)}  # the OCR read every page as the manifest has it
    rows = [
        {"page_id": p.page_id, "checksum": read[p.page_id], "text": t, "status": "ok", "error": ""}
        for p, t in zip(pages, texts)
    ]
    rows += [
        {"page_id": p.page_id, "checksum": p.checksum, "text": "", "status": "error", "error": "outside"} for p in evil
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=OCR_SCHEMA), out / OCR_FILE)
    return out


@pytest.fixture(scope="module")
def api_index(corpus, bundled_index, embedder, tmp_path_factory) -> Path:
    """The bundled index plus the out-of-corpus page: the server refuses an index that is not current."""
    out = tmp_path_factory.mktemp("index") / "index"
    shutil.copytree(bundled_index, out)
    MultiVectorIndex.load(out).add_pages(corpus, ["evil_1"], embedder, progress=False)
    return out


@pytest.fixture(scope="module")
def retriever(corpus, api_index, embedder) -> LocalRetriever:
    return LocalRetriever(corpus, api_index, embedder)


@pytest.fixture(scope="module")
def server(retriever):
    with serve_app(create_app(retriever, LIMITS)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def raw_get(base: str, target: str) -> tuple[int, bytes, str]:
    """A GET with the request target sent byte for byte (httpx would normalise '..' segments away)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("content-type", "")
    finally:
        conn.close()


def test_get_search_matches_reference_contract(client, retriever):
    r = client.get("/search", params={"queries": QUERIES})
    assert r.status_code == 200
    body = r.json()
    want = retriever.search(QUERIES, top_k=10)  # the reference returns 10 pages per query
    assert isinstance(body, list) and len(body) == len(QUERIES)
    for got, hits in zip(body, want):
        assert got == [{"idx": i, "image_file": h.image_path} for i, h in enumerate(hits)]
        assert all(set(x) == {"idx", "image_file"} and Path(x["image_file"]).is_file() for x in got)
    r = client.get("/search", params={"queries": QUERIES[:1], "top_k": 3})
    assert [x["image_file"] for x in r.json()[0]] == [h.image_path for h in want[0][:3]]


@pytest.mark.parametrize("mode", ["visual", "text", "hybrid"])
def test_post_search_modes(client, retriever, mode):
    r = client.post("/search", json={"queries": QUERIES, "top_k": 4, "mode": mode})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_results"] == []
    for got, hits in zip(body["results"], retriever.search(QUERIES, 4, mode), strict=True):
        want = [
            {"idx": i, "page_id": h.page_id, "score": h.score, "image_file": h.image_path} for i, h in enumerate(hits)
        ]
        assert got == want
    if mode == "text":
        assert body["results"][2][0]["page_id"] == retriever.page_ids[4]


def test_post_image_query(client, retriever, bundled_corpus):
    data = (bundled_corpus / "pages" / "doc0002_3.jpg").read_bytes()
    payload = {"queries": ["revenue"], "image_queries": [b64(data), "data:image/jpeg;base64," + b64(data)], "top_k": 3}
    r = client.post("/search", json=payload)
    assert r.status_code == 200, r.text
    body = r.json()
    want = retriever.search_by_image([Image.open(io.BytesIO(data)).convert("RGB")], 3)[0]
    for got in body["image_results"]:
        assert [(x["page_id"], x["score"]) for x in got] == [(h.page_id, h.score) for h in want]
        assert got[0]["page_id"] == "doc0002_3"
    assert [x["page_id"] for x in body["results"][0]] == [h.page_id for h in retriever.search(["revenue"], 3)[0]]


@pytest.mark.parametrize("mode", ["visual", "text", "hybrid"])
def test_the_search_client_is_the_retriever_over_http(server, corpus, retriever, bundled_corpus, mode):
    """``retrieval.client.SearchClient`` (what ``vrag_rl.serve --search-url`` searches with) returns the retriever's
    own hits, text and image queries alike."""
    search = SearchClient(server, corpus)
    assert search.search(QUERIES, 4, mode) == retriever.search(QUERIES, 4, mode)
    with Image.open(bundled_corpus / "pages" / "doc0002_3.jpg") as im:
        image = im.convert("RGB")
    assert search.search_by_image([image], 3) == retriever.search_by_image([image], 3)
    assert search.page_path("doc0002_3") == retriever.page_path("doc0002_3")
    assert search.health() is None
    search.close()


def test_the_search_client_names_a_server_that_is_down(corpus, closed_port_url):
    down = SearchClient(closed_port_url.removesuffix("/v1"), corpus, timeout_s=2)
    assert down.health().startswith("the search API at http://127.0.0.1:")
    with pytest.raises(RuntimeError, match="the search API at .* does not answer: ConnectError"):
        down.search(["revenue"], 3)


def test_pages_are_served_byte_for_byte(client, corpus):
    for pid in ["doc0000_1", "doc0007_3"]:
        r = client.get(f"/pages/{pid}")
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/jpeg"
        assert r.content == (corpus / "pages" / f"{pid}.jpg").read_bytes()


def test_health(client):
    assert client.get("/health").json() == {"status": "ok", "pages": 25, "modes": ["visual", "text", "hybrid"]}


def tiny_png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "payload, status, detail",
    [
        ({"queries": ["q"] * 9}, 422, "limit is 8"),
        ({"queries": ["q"] * 5, "image_queries": ["x"] * 4}, 422, "limit is 8"),
        ({"queries": ["x" * 201]}, 422, "limit is 200"),
        ({"queries": ["ok", "   "]}, 422, "query 1 is empty"),
        ({"queries": []}, 422, "no queries"),
        ({"queries": ["q"], "top_k": 0}, 422, "top_k"),
        ({"queries": ["q"], "top_k": 21}, 422, "top_k"),
        ({"queries": ["q"], "mode": "bm25"}, 422, None),
        ({"queries": "q"}, 422, None),
        ({"queries": ["q"], "topk": 3}, 422, None),
        ({"image_queries": ["not base64!"]}, 400, "not valid base64"),
        ({"image_queries": [b64(b"GIF89a not really")]}, 400, "not a decodable image"),
        ({"image_queries": [b64(b"")]}, 400, "not a decodable image"),
        ({"image_queries": [b64(tiny_png(3000, 3000))]}, 413, "pixels"),
        ({"image_queries": ["A" * 400_004]}, 413, "300000 bytes"),
    ],
)
def test_post_validation(client, payload, status, detail):
    r = client.post("/search", json=payload)
    assert r.status_code == status, r.text
    assert "detail" in r.json()
    if detail:
        assert detail in r.json()["detail"]


def test_truncated_image_is_400(client, bundled_corpus):
    data = (bundled_corpus / "pages" / "doc0000_1.jpg").read_bytes()
    r = client.post("/search", json={"image_queries": [b64(data[: len(data) // 2])]})
    assert r.status_code == 400 and "not a decodable image" in r.json()["detail"]


def test_get_validation(client):
    cases = [
        ({}, 422),
        ({"queries": ["q"] * 9}, 422),
        ({"queries": ["x" * 201]}, 422),
        ({"queries": ["q"], "top_k": 0}, 422),
        ({"queries": ["q"], "top_k": "many"}, 422),
        ({"queries": [""]}, 422),
    ]
    for params, status in cases:
        r = client.get("/search", params=params)
        assert r.status_code == status, (params, r.text)
        assert "detail" in r.json()


def test_body_limits(client):
    big = json.dumps({"queries": ["q"], "pad": "x" * 1_100_000})
    r = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body over" in r.json()["detail"]

    def chunks():  # no content-length: the limit must hold while streaming
        for _ in range(12):
            yield b" " * 100_000
        yield b'{"queries": ["q"]}'

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body over" in r.json()["detail"]
    r = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_past_the_in_flight_limit_a_request_gets_503_with_retry_after(retriever):
    with serve_app(create_app(retriever, Limits(max_in_flight=1))) as url, request_in_flight(url, "/search"):
        r = httpx.post(url + "/search", json={"queries": ["q"]}, timeout=30)
        health = httpx.get(url + "/health", timeout=30)  # answered outside the limit
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json() == {"detail": "busy: 1 requests in flight; retry shortly"}
    assert health.status_code == 200 and health.json()["status"] == "ok"


KEY = "search-key-0123456789"


def test_a_foreign_host_and_a_missing_key_are_refused(retriever, corpus):
    """A web page rebinding its name to 127.0.0.1 is refused by its Host; with a key, only /health is public, and
    the search client (what ``vrag_rl.serve --search-url`` uses) sends it."""
    with serve_app(create_app(retriever, LIMITS, Access(KEY))) as url:
        foreign = httpx.get(url + "/health", headers={"Host": "attacker.example"})
        assert foreign.status_code == 400 and "Host" in foreign.json()["detail"]
        assert httpx.get(url + "/health").status_code == 200
        for method, path in [("GET", "/search?queries=q"), ("POST", "/search"), ("GET", "/pages/doc0000_1")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = httpx.request(method, url + path, json={"queries": ["q"]}, headers=headers)
                assert r.status_code == 401 and "API key" in r.json()["detail"], (path, r.text)
        with_key = SearchClient(url, corpus, api_key=KEY)
        assert with_key.search(QUERIES, 3) == retriever.search(QUERIES, 3)
        with_key.close()
        without = SearchClient(url, corpus)
        assert without.health() is None  # /health is public: the server is up
        with pytest.raises(RuntimeError, match="answered 401"):
            without.search(QUERIES, 3)
        without.close()


def test_off_loopback_image_files_are_relative_to_the_corpus(retriever, corpus):
    """A server bound elsewhere names no path of its machine: image files are relative to the corpus."""
    with serve_app(create_app(retriever, LIMITS, local_paths=False)) as url:
        got = httpx.get(url + "/search", params={"queries": QUERIES[:1], "top_k": 3}).json()[0]
        posted = httpx.post(url + "/search", json={"queries": QUERIES[:1], "top_k": 3}).json()["results"][0]
    want = retriever.search(QUERIES[:1], 3)[0]
    assert [x["image_file"] for x in got] == [str(Path(h.image_path).relative_to(corpus)) for h in want]
    assert [x["image_file"] for x in posted] == [x["image_file"] for x in got]
    assert all(not Path(x["image_file"]).is_absolute() and (corpus / x["image_file"]).is_file() for x in got)


def test_the_cli_refuses_to_start_open_to_other_machines(capsys):
    from vrag_rl.retrieval import api

    assert api.main(["--corpus", "c", "--index", "i", "--model", "m", "--host", "0.0.0.0"]) == 2
    assert "--host 0.0.0.0 is reachable from other machines: set --api-key-env" in capsys.readouterr().err


def test_a_body_of_many_json_values_is_refused_before_it_is_parsed(client):
    body = b'{"queries": [' + b'"q",' * 200_000 + b'"q"]}'
    r = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json() == {"detail": "the request body holds over 100000 JSON values"}


def test_unknown_routes_and_unplanned_failures_answer_in_the_same_shape(client, retriever, monkeypatch):
    assert client.get("/nope").json() == {"detail": "Not Found: GET /nope"}
    assert client.put("/search").json() == {"detail": "Method Not Allowed: PUT /search"}

    def fail(*args):
        raise RuntimeError("/srv/secret/path: an internal failure")

    monkeypatch.setattr(retriever, "search", fail)
    r = client.post("/search", json={"queries": ["q"]})
    assert r.status_code == 500 and r.json() == {"detail": "internal server error; the server's log has the details"}
    monkeypatch.undo()
    assert client.post("/search", json={"queries": ["q"]}).status_code == 200  # on the same connection, kept open


def test_text_mode_without_text_index_is_400(client, retriever, monkeypatch):
    monkeypatch.setattr(retriever, "text_index", None)
    r = client.post("/search", json={"queries": ["q"], "mode": "text"})
    assert r.status_code == 400 and "text index" in r.json()["detail"]


@pytest.mark.parametrize(
    "target, statuses",
    [
        ("/pages/..%2Fpages.parquet", {404}),  # decoded to a second path segment: no such route
        ("/pages/%2e%2e%2fpages.parquet", {404}),
        ("/pages/..%5C..%5Cpages.parquet", {400}),
        ("/pages/%2Fetc%2Fpasswd", {404}),
        ("/pages/..", {400, 404}),
        ("/pages/%2e%2e", {400}),
        ("/pages/.hidden", {400}),
        ("/pages/doc0000_1%00", {400}),
        ("/pages/doc0000_1.jpg", {404}),
        ("/pages/pages.parquet", {404}),
        ("/pages/pages%2Fdoc0000_1.jpg", {404}),
        ("/pages/../pages.parquet", {404}),
        ("/pages/doc9999_1", {404}),
        ("/pages/evil_1", {403}),  # a manifest page symlinked out of the corpus
    ],
)
def test_page_traversal_is_refused(server, target, statuses):
    status, body, ctype = raw_get(server, target)
    assert status in statuses, (target, status, body)
    assert not body.startswith(b"\xff\xd8")  # never a JPEG (the secret outside the corpus is one)
    assert ctype == "application/json" and "detail" in json.loads(body)


@contextlib.contextmanager
def cli_server(corpus: Path, index: Path, model: Path):
    """``python -m vrag_rl.retrieval.api`` on a free loopback port: yields (base URL, the server process)."""
    cmd = [sys.executable, "-m", "vrag_rl.retrieval.api", "--corpus", str(corpus), "--index", str(index)]
    proc = subprocess.Popen(
        [*cmd, "--model", str(model), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "server exited:\n" + "".join(lines)
            lines.append(line)
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                break
        else:
            pytest.fail("server did not start in 120 s:\n" + "".join(lines))
        yield f"http://127.0.0.1:{m.group(1)}", proc
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow  # a `python -m vrag_rl.retrieval.api` server process
def test_cli_serves_on_loopback(corpus, api_index, tiny_dirs, retriever):
    """``python -m vrag_rl.retrieval.api`` as documented, on a free port; same answers as the LocalRetriever."""
    with cli_server(corpus, api_index, tiny_dirs["retriever"]) as (base, _):
        r = httpx.get(base + "/search", params={"queries": QUERIES[:2], "top_k": 5}, timeout=60)
        want = retriever.search(QUERIES[:2], 5)
        assert r.json() == [[{"idx": i, "image_file": h.image_path} for i, h in enumerate(hits)] for hits in want]
        r = httpx.post(base + "/search", json={"queries": ["word2"], "mode": "hybrid", "top_k": 2}, timeout=60)
        assert r.status_code == 200  # text modes from CORPUS/ocr.parquet, found without a flag


@pytest.mark.slow  # a `python -m vrag_rl.retrieval.api` process
def test_cli_refuses_a_stale_index(bundled_corpus, api_index, tiny_dirs):
    """The api index holds two pages the bundled corpus lacks: the server must not start on it."""
    cmd = [
        sys.executable,
        "-m",
        "vrag_rl.retrieval.api",
        "--corpus",
        str(bundled_corpus),
        "--index",
        str(api_index),
        "--model",
        str(tiny_dirs["retriever"]),
        "--port",
        "0",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "stale" in out.stderr and "removed" in out.stderr and "Uvicorn running" not in out.stderr


def _png_b64(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")  # uniform: a tiny file, 3 bytes a pixel decoded
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow  # a server process and 16 40-megapixel queries
def test_a_burst_of_maximal_image_queries_keeps_memory_bounded(corpus, api_index, tiny_dirs):
    """16 concurrent requests, each a 40-megapixel image (120 MB decoded), at a real server process on
    127.0.0.1: every answer is 200 or a JSON 503, the server's memory grows by far less than 16 decodes would
    take, it stays healthy, and requests beyond the per-request pixel bound or in other formats are refused."""
    import psutil

    with cli_server(corpus, api_index, tiny_dirs["retriever"]) as (base, proc):
        big = _png_b64((8000, 5000))
        server = psutil.Process(proc.pid)
        baseline, peak, done = server.memory_info().rss, [0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], server.memory_info().rss)
                time.sleep(0.02)

        answers: list[httpx.Response] = []

        def ask():
            answers.append(httpx.post(base + "/search", json={"image_queries": [big], "top_k": 3}, timeout=300))

        watcher = threading.Thread(target=watch)
        watcher.start()
        askers = [threading.Thread(target=ask) for _ in range(16)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(600)
        done.set()
        watcher.join()
        assert len(answers) == 16 and {r.status_code for r in answers} <= {200, 503}
        assert any(r.status_code == 200 for r in answers)
        assert all("detail" in r.json() for r in answers if r.status_code == 503)
        assert peak[0] - baseline < 1_200_000_000, (baseline, peak[0])  # 16 decodes alone would be ~1.9 GB
        three = httpx.post(base + "/search", json={"image_queries": [big] * 3}, timeout=60)
        assert three.status_code == 413 and "pixels" in three.json()["detail"]
        eps = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n").decode()
        refused = httpx.post(base + "/search", json={"image_queries": [eps]}, timeout=60)
        assert refused.status_code == 400
        assert httpx.get(base + "/health", timeout=30).json()["status"] == "ok"


@pytest.mark.slow  # a few hundred requests, tens of seconds
def test_fuzzed_requests_get_no_server_error_and_errors_in_its_shape(server):
    """schemathesis, from the search API's OpenAPI document, against the server on 127.0.0.1 (uvicorn serving the
    app in this process): valid and invalid requests to every operation; no 5xx but 503, no reply later than
    30 s, every error ``{"detail": message}``, and this process's memory within 300 MB of where it began."""
    from fuzz_api import detail_shape, fuzz

    fuzzed = fuzz(server, os.getpid(), detail_shape, per_operation=100, limit_s=90)
    print(f"search API fuzzed: {fuzzed}")
    assert fuzzed.failures == [], fuzzed.failures[:10]
    assert fuzzed.tried >= 400 and fuzzed.peak_growth < 300_000_000, fuzzed
