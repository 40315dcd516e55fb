"""Load on 127.0.0.1, bounded in count and time: concurrent clients within capacity all get answers, and their
turns share engine steps; past capacity the surplus gets 503 with Retry-After and the server goes on; a burst of
requests built to cost memory keeps the server's memory bounded."""

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
from PIL import Image
from serve_process import MAX_LIVE, MAX_WAITING

from vrag_rl.data.records import load_qa

JSON = {"content-type": "application/json"}


def burst(url: str, questions: list[str]) -> list[httpx.Response]:
    def one(q: str) -> httpx.Response:
        body = {"model": "vrag-agent", "messages": [{"role": "user", "content": q}]}
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=180)

    with ThreadPoolExecutor(len(questions)) as pool:
        return list(pool.map(one, questions))


def test_clients_within_capacity_all_get_answers_from_shared_steps(agent_server, bundled_corpus):
    before = httpx.get(agent_server.url + "/ready").json()
    questions = [r.question for r in load_qa(bundled_corpus)[: MAX_LIVE + MAX_WAITING]]
    replies = burst(agent_server.url, questions)
    assert [r.status_code for r in replies] == [200] * len(questions)
    assert all(r.json()["vrag"]["type"] == "result" for r in replies)
    after = httpx.get(agent_server.url + "/ready").json()
    turns = sum(len(r.json()["vrag"]["turns"]) for r in replies)
    assert after["session_turns"] - before["session_turns"] == turns
    steps = after["engine_steps"] - before["engine_steps"]
    assert (after["engine_batched"] - before["engine_batched"]) / steps > 2  # more than two sessions' turns a step


def test_past_capacity_the_surplus_gets_503_with_retry_after(agent_server, bundled_corpus):
    questions = [r.question for r in load_qa(bundled_corpus)[:8]] * 3  # 24 at once against 8 places
    replies = burst(agent_server.url, questions)
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {200, 503} and statuses.count(200) >= MAX_LIVE + MAX_WAITING
    refused = [r for r in replies if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["error"]["message"] for r in refused)
    assert httpx.get(agent_server.url + "/ready").json()["live"] == 0
    assert burst(agent_server.url, questions[:1])[0].status_code == 200  # the server went on


def one_bit_png(w: int, h: int) -> str:
    """A bilevel PNG of ``w`` x ``h`` pixels as a data: URL: a few KB that decode to a full-size raster."""
    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_burst_of_costly_requests_keeps_memory_bounded(agent_server):
    """16 concurrent requests at the served agent on 127.0.0.1, each built to cost memory: 8 bodies of 16 MB of
    empty JSON objects (5.3 million of them: about 800 MB as Python objects) and 8 questions with a 6.6 KB 1-bit PNG
    of 8000x5000 pixels (216 MB at its peak decoded naively), streamed and left after the first event. Every reply
    is 200, 413 or 503 in OpenAI's shape; the server's memory grows by under 500 MB and it goes on answering."""
    empties = b'{"messages": [' + b"{}," * 5_300_000 + b'{"role": "user", "content": "q"}]}'
    bomb = one_bit_png(8000, 5000)
    server = psutil.Process(agent_server.proc.pid)
    baseline, peak, done = server.memory_info().rss, [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], server.memory_info().rss)
            time.sleep(0.02)

    def values() -> tuple[int, dict]:
        r = httpx.post(agent_server.url + "/v1/chat/completions", content=empties, timeout=120, headers=JSON)
        return r.status_code, r.json()

    def image() -> tuple[int, dict]:
        content = [
            {"type": "text", "text": "What does this page report?"},
            {"type": "image_url", "image_url": {"url": bomb}},
        ]
        body = {"model": "vrag-agent", "stream": True, "messages": [{"role": "user", "content": content}]}
        with httpx.stream("POST", agent_server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            if r.status_code != 200:
                return r.status_code, json.loads(r.read())
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            return 200, json.loads(first.removeprefix("data: "))  # then the stream is closed: the session ends

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(values) for _ in range(8)] + [pool.submit(image) for _ in range(8)]
        replies = [f.result() for f in futures]
    done.set()
    watcher.join()
    assert [s for s, _ in replies[:8]] == [413] * 8, replies[:8]
    assert all(b["error"]["message"] == "the request body holds over 100000 JSON values" for _, b in replies[:8])
    assert {s for s, _ in replies[8:]} <= {200, 503} and any(s == 200 for s, _ in replies[8:]), replies[8:]
    assert all(b["object"] == "chat.completion.chunk" for s, b in replies[8:] if s == 200)
    assert all(b["error"]["code"] == 503 for s, b in replies[8:] if s == 503)
    print(f"burst: the server grew by {(peak[0] - baseline) / 1e6:.0f} MB at its peak")
    assert peak[0] - baseline < 500_000_000, (baseline, peak[0])
    over = one_bit_png(8000, 6000)  # 48 megapixels: refused from its header, never decoded
    content = [{"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": over}}]
    r = httpx.post(agent_server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]
    deadline = time.monotonic() + 120
    while (ready := httpx.get(agent_server.url + "/ready", timeout=30).json())["live"] + ready["waiting"]:
        assert time.monotonic() < deadline, ready  # the left sessions end at their next turn
        time.sleep(0.5)
