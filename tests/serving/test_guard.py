"""Who may ask the agent API and what a request may cost, against in-process apps served by uvicorn on 127.0.0.1
with no policy: the Host allow-list and the API key (the official ``openai`` client with the right key, a wrong one
and none), bodies that trickle in, JSON bodies of many values, malformed chat parts, crop boxes far beyond their
page, and the dependency floors these rely on."""

from __future__ import annotations

import io
import socket
import threading
import time
import tomllib
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from asgi_thread import serve_app
from packaging.requirements import Requirement
from packaging.version import Version
from PIL import Image

from vrag_rl.http_guard import Access, RequestLimits, access_of
from vrag_rl.retrieval.base import PageCatalog
from vrag_rl.serving.app import PUBLIC, create_app

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-0123456789abcdef"
NOT_READY = "no policy in this test"


def app_of(corpus: Path, limits: RequestLimits = RequestLimits(max_body_bytes=16 << 20), key: str | None = None):
    access = Access(key, public=PUBLIC)
    return create_app(None, PageCatalog(corpus), {}, "vrag-agent", lambda: NOT_READY, limits=limits, access=access)


@pytest.fixture(scope="module")
def open_url(bundled_corpus):
    with serve_app(app_of(bundled_corpus)) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_url(bundled_corpus):
    with serve_app(app_of(bundled_corpus, key=KEY)) as url:
        yield url


def openai_error(status: int, message: str) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


# ---- item: Host allow-list and API key ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/ready", "/v1/corpus", "/pages/doc0001_1", "/"])
def test_a_foreign_host_is_refused_whatever_the_path(open_url, path):
    """A web page that rebinds its own name to 127.0.0.1 sends its own name as Host: it reads nothing."""
    reply = httpx.get(open_url + path, headers={"Host": "attacker.example:8000"})
    message = "this server does not answer to that Host name (see --allow-host)"
    assert reply.status_code == 400 and reply.json() == openai_error(400, message)


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000"])
def test_loopback_names_are_allowed(open_url, host):
    assert httpx.get(open_url + "/v1/models", headers={"Host": host}).status_code == 200


def test_the_openai_client_with_the_right_key_a_wrong_one_and_none(keyed_url):
    with openai.OpenAI(base_url=keyed_url + "/v1", api_key=KEY, max_retries=0, timeout=30) as client:
        assert [m.id for m in client.models.list()] == ["vrag-agent"]
        with pytest.raises(openai.InternalServerError) as err:  # past the key: the server is not ready
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])
        assert err.value.status_code == 503 and NOT_READY in err.value.message
    with openai.OpenAI(base_url=keyed_url + "/v1", api_key="sk-wrong", max_retries=0, timeout=30) as client:
        with pytest.raises(openai.AuthenticationError) as err:
            client.models.list()
        assert err.value.status_code == 401 and "API key" in err.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])
    for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer x"}):
        reply = httpx.get(keyed_url + "/v1/models", headers=headers)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert reply.json()["error"]["code"] == 401


def test_with_a_key_only_health_and_the_page_are_public(keyed_url):
    for path in ["/health", "/", "/static/app.js", "/static/style.css"]:
        assert httpx.get(keyed_url + path).status_code == 200, path
    for path in ["/ready", "/v1/corpus", "/v1/models", "/pages/doc0001_1", "/openapi.json", "/static/../ready"]:
        assert httpx.get(keyed_url + path).status_code == 401, path
        assert httpx.get(keyed_url + path, headers={"Authorization": f"Bearer {KEY}"}).status_code != 401, path


def test_a_server_off_loopback_needs_a_key(monkeypatch):
    for host in ["0.0.0.0", "::", "192.0.2.7", "agent.example"]:
        with pytest.raises(ValueError, match="--api-key-env"):
            access_of(host, [], None, PUBLIC)
    monkeypatch.setenv("VRAG_TEST_AGENT_KEY", KEY)
    access = access_of("192.0.2.7", ["agent.example"], "VRAG_TEST_AGENT_KEY", PUBLIC)
    assert access.api_key == KEY and {"192.0.2.7", "agent.example", "localhost"} <= set(access.hosts)
    with pytest.raises(ValueError, match="not set"):
        access_of("127.0.0.1", [], "VRAG_TEST_UNSET_KEY", PUBLIC)


def test_serve_refuses_to_start_open_to_other_machines(capsys):
    """Before anything loads (no model, no corpus read): the exit status and the reason."""
    from vrag_rl import serve

    assert serve.main(["--host", "0.0.0.0", "--corpus", "/nonexistent"]) == 2
    assert "--host 0.0.0.0 is reachable from other machines: set --api-key-env" in capsys.readouterr().err


def test_ready_names_no_address_or_path(bundled_corpus, closed_port_url, tmp_path, caplog):
    """The search API and the policy endpoint down: clients read what is down, the log reads where."""
    from vrag_rl.serve import Probe, endpoint_check

    probe = Probe(endpoint_check(closed_port_url), "the policy endpoint does not answer")
    with caplog.at_level("WARNING", logger="vrag_rl.serve"):
        assert probe() == "the policy endpoint does not answer"
        assert probe() == "the policy endpoint does not answer"  # cached; the log has it once
    assert [r.getMessage() for r in caplog.records] == [
        f"not ready: the policy endpoint {closed_port_url} does not answer (ConnectError)"
    ]


# ---- item: bodies that trickle in, and /health outside the limit ---------------------------------------------------


def trickle(url: str, path: str) -> socket.socket:
    """A POST whose 1000-byte body comes one byte every 0.2 s (it would take 200 s)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    sock.sendall(head.encode())
    return sock


def test_bodies_that_trickle_in_time_out_and_health_answers_meanwhile(bundled_corpus):
    """Six connections trickling bodies at a server of two places and a 1 s body timeout: /health answers at once
    throughout, every trickler gets 408 after about a second, and the server serves again."""
    limits = RequestLimits(max_in_flight=2, body_timeout_s=1.0)
    with serve_app(app_of(bundled_corpus, limits)) as url:
        socks = [trickle(url, "/v1/chat/completions") for _ in range(6)]
        stop, replies = threading.Event(), {}

        def drip(i: int, sock: socket.socket) -> None:
            try:
                while not stop.is_set():
                    sock.sendall(b" ")
                    if stop.wait(0.2):
                        break
            except OSError:  # the server answered and closed
                pass

        def read(i: int, sock: socket.socket) -> None:
            try:
                replies[i] = sock.recv(65536).decode(errors="replace")
            except OSError as err:
                replies[i] = repr(err)

        threads = [threading.Thread(target=f, args=(i, s)) for i, s in enumerate(socks) for f in (drip, read)]
        for t in threads:
            t.start()
        started = time.monotonic()
        try:
            while time.monotonic() - started < 0.8:  # while every place is held by a trickler
                assert httpx.get(url + "/health", timeout=2).json() == {"status": "ok"}
                time.sleep(0.1)
            for t in threads[1::2]:
                t.join(10)
        finally:
            stop.set()
            for s in socks:
                s.close()
        assert len(replies) == 6, replies
        statuses = sorted(r.split(" ", 2)[1] for r in replies.values())
        assert statuses.count("408") == 2 and set(statuses) <= {"408", "503"}, replies  # 2 places, 4 refused
        assert all("did not arrive within 1 s" in r for r in replies.values() if " 408 " in r)
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 200


# ---- item: requests that would cost memory -----------------------------------------------------------------------


def test_a_body_of_millions_of_json_values_is_refused_before_it_is_parsed(open_url):
    """16 MB of empty objects would take about 800 MB and seconds of the event loop as Python objects."""
    body = b'{"messages": [' + b"{}," * 5_000_000 + b'{"role": "user", "content": "q"}]}'
    started = time.monotonic()
    reply = httpx.post(open_url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 413, reply.text
    assert reply.json() == openai_error(413, "the request body holds over 100000 JSON values")
    assert time.monotonic() - started < 10
    many = {"messages": [{"role": "user", "content": "q"}] * 257}
    reply = httpx.post(open_url + "/v1/chat/completions", json=many)
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "messages"


MALFORMED_PARTS = {
    "text not a string": ([{"type": "text", "text": 5}], "messages[0].content[0].text"),
    "url null": ([{"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": None}}], "content[1]"),
    "image_url a number": ([{"type": "image_url", "image_url": 7}, {"type": "text", "text": "q"}], "content[0]"),
    "part not an object": (["q"], "messages[0].content[0]"),
    "unknown part type": ([{"type": "audio", "data": "x"}], "messages[0].content[0]"),
    "content a number": (5, "messages[0].content"),
    "too many parts": ([{"type": "text", "text": "q"}] * 65, "messages[0].content"),
}


@pytest.mark.parametrize("content, param", MALFORMED_PARTS.values(), ids=MALFORMED_PARTS)
def test_malformed_chat_parts_are_400s_naming_the_part(open_url, content, param):
    with openai.OpenAI(base_url=open_url + "/v1", api_key="unused", max_retries=0, timeout=30) as client:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}])
    assert err.value.status_code == 400 and param in err.value.body["param"] and param in err.value.body["message"]


def test_an_image_url_given_as_a_string_is_taken(open_url):
    """The older OpenAI form: the part is accepted (the request reaches readiness: this app has no policy)."""
    content = [{"type": "text", "text": "q"}, {"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]
    reply = httpx.post(open_url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert reply.status_code == 503 and reply.json()["error"]["message"] == NOT_READY


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_sent_as_json_is_not_read_as_json(open_url, content_type):
    """What a web page can send without a CORS preflight never reaches the agent (fastapi >= 0.132)."""
    headers = {"content-type": content_type} if content_type else {}
    body = b'{"messages": [{"role": "user", "content": "q"}]}'
    reply = httpx.post(open_url + "/v1/chat/completions", content=body, headers=headers)
    assert reply.status_code == 422 and reply.json()["error"]["code"] == 422


def test_the_dependency_floors_admit_no_version_without_that_behaviour():
    """fastapi parses a body without a JSON Content-Type as JSON before 0.132: no declared floor may admit one."""
    import fastapi

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    floors = [Requirement(r) for r in declared if Requirement(r).name == "fastapi"]
    assert len(floors) == 2
    for req in floors:
        assert not req.specifier.contains("0.131.99") and req.specifier.contains(fastapi.__version__), str(req)
    assert Version(fastapi.__version__) >= Version("0.132")


# ---- item: crop boxes -----------------------------------------------------------------------------------------------


def peak_growth(fn) -> tuple[int, object]:
    """(the peak growth of this process's memory while ``fn`` runs, its result), sampled every 5 ms."""
    me, done, peak = psutil.Process(), threading.Event(), [0]
    base = me.memory_info().rss

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss - base)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = fn()
    finally:
        done.set()
        watcher.join()
    return peak[0], result


def test_a_box_far_beyond_its_page_is_cut_to_the_page_first(open_url):
    """A 13000x13000 box (over Pillow's bomb limit at 20000) on a 480x640 page: the page's crop, at little cost."""
    whole = httpx.get(open_url + "/pages/doc0000_2", params={"box": "0,0,480,640", "side": 300})
    for box in ["0,0,13000,13000", "-5000,-5000,20000,20000", "0,0,1e9,1e9"]:
        grown, reply = peak_growth(
            lambda b=box: httpx.get(open_url + "/pages/doc0000_2", params={"box": b, "side": 300})
        )
        assert reply.status_code == 200 and reply.content == whole.content, box
        assert grown < 150_000_000, (box, grown)  # the whole box as RGB would be 500 MB and more
    with Image.open(io.BytesIO(whole.content)) as im:
        assert im.size == (225, 300)


@pytest.mark.parametrize(
    "box", ["0,0,inf,5", "nan,0,5,5", "0,0,5", "a,b,c,d", "5,5,1,1", "-50,-50,-10,-10", "600,0,700,10", "0,0,-inf,5"]
)
def test_bad_or_empty_boxes_are_400s(open_url, box):
    reply = httpx.get(open_url + "/pages/doc0000_2", params={"box": box})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == 400, (box, reply.text)
