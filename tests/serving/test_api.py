"""The agent API as clients use it: the official ``openai`` client, streaming and not, against the served process."""

import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from vrag_rl.data.records import load_pages, load_qa

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(agent_server):
    with openai.OpenAI(base_url=agent_server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def questions(bundled_corpus):
    return load_qa(bundled_corpus)[:2]


@pytest.fixture(scope="module")
def sizes(bundled_corpus):
    return {p.page_id: (p.width, p.height) for p in load_pages(bundled_corpus)}


def ask(client, text: str, **kw):
    return client.chat.completions.create(model="vrag-agent", messages=[{"role": "user", "content": text}], **kw)


def check_result(result: dict, sizes: dict) -> None:
    """Citations are views the turns showed, with boxes inside their pages; the last one shown is marked."""

    def key(view: dict) -> tuple:
        return view["page"], None if view["box"] is None else tuple(view["box"])

    shown = [key(v) for t in result["turns"] for v in t["views"]]
    cited = [key(c) for c in result["citations"]]
    assert cited == list(dict.fromkeys(shown))
    if result["answer"] is not None and shown:
        assert [key(c) for c in result["citations"] if c["last"]] == [shown[-1]]
    for c in result["citations"]:
        assert (c["width"], c["height"]) == sizes[c["page"]]
        assert c["url"] == f"/pages/{c['page']}"
        if c["box"] is not None:
            x0, y0, x1, y1 = c["box"]
            assert 0 <= x0 < x1 <= c["width"] and 0 <= y0 < y1 <= c["height"]
            assert c["crop_url"] == f"/pages/{c['page']}?box={x0},{y0},{x1},{y1}"
    assert result["searches"] == sum(t["action"] == "search" for t in result["turns"])


def test_answers_with_citations_and_the_trajectory(client, questions, sizes):
    reply = ask(client, questions[0].question)
    result = reply.model_extra["vrag"]
    assert reply.choices[0].message.content == (result["answer"] or "")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens > 0
    assert result["turns"] and result["turns"][0]["action"] == "search"
    check_result(result, sizes)
    assert [m.id for m in client.models.list().data] == ["vrag-agent"]


def test_streams_each_turn_then_the_answer(client, questions, sizes):
    chunks = list(ask(client, questions[1].question, stream=True))
    events = [c.model_extra["vrag"] for c in chunks if c.model_extra.get("vrag")]
    *turns, result = events
    assert result["type"] == "result" and [t["turn"] for t in turns] == list(range(1, len(turns) + 1))
    assert turns == result["turns"]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == (result["answer"] or "")
    assert chunks[-1].choices[0].finish_reason == ("stop" if result["answer"] is not None else "length")
    check_result(result, sizes)


def test_serving_runs_the_agent_loop_of_evaluation_unchanged(client, questions, warm_policy, tiny_dirs, tmp_path):
    """The served trajectory equals the one ``vrag_rl.watch`` samples for the same question with the same engine
    (greedy, one question alone in its batch)."""
    out = tmp_path / "watch"
    cmd = [sys.executable, "-m", "vrag_rl.watch", "--policy", str(warm_policy), "--questions", "1", "--out", str(out)]
    cmd += ["--retriever-model", str(tiny_dirs["retriever"])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    watched = json.loads((out / "trajectories.jsonl").read_text())
    served = ask(client, questions[0].question).model_extra["vrag"]
    assert [t["text"] for t in served["turns"]] == [t["text"] for t in watched["turns"]]
    assert [v["page"] for t in served["turns"] for v in t["views"] if v["box"] is None] == watched["retrieved_pages"]
    assert served["answer"] == watched["answer"]


def test_a_stream_closed_by_its_client_ends_its_session_early(client, agent_server, questions):
    def ready() -> dict:
        return httpx.get(agent_server.url + "/ready").json()

    full = len(ask(client, questions[0].question).model_extra["vrag"]["turns"])  # the session run to its end
    before = ready()["session_turns"]
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": questions[0].question}]}
    with httpx.stream("POST", agent_server.url + "/v1/chat/completions", json=body, timeout=60) as stream:
        first = json.loads(next(stream.iter_lines()).removeprefix("data: "))
        assert first["choices"][0]["delta"]["role"] == "assistant"
    deadline = time.monotonic() + 30
    while ready()["live"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready()["live"] == 0 and ready()["session_turns"] - before < full


def page_png(bundled_corpus, page_id: str) -> str:
    with Image.open(bundled_corpus / "pages" / f"{page_id}.jpg") as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_search_by_image_shows_the_pages_like_it(client, bundled_corpus, sizes):
    content = [
        {"type": "text", "text": "What does this page report?"},
        {"type": "image_url", "image_url": {"url": page_png(bundled_corpus, "doc0002_2")}},
    ]
    messages = [{"role": "user", "content": content}]
    chunks = list(client.chat.completions.create(model="m", messages=messages, stream=True))
    events = [c.model_extra["vrag"] for c in chunks if c.model_extra.get("vrag")]
    assert events[0]["type"] == "image_search"
    assert events[0]["views"][0]["page"] == "doc0002_2"  # a page is nearest to itself
    result = events[-1]
    assert result["type"] == "result" and len(result["turns"]) == 1  # one answer turn over the pages shown
    assert [c["page"] for c in result["citations"]] == [v["page"] for v in events[0]["views"]]


def test_health_readiness_pages_and_limits(agent_server, sizes):
    with httpx.Client(base_url=agent_server.url, timeout=30) as http:
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready").json()
        assert ready["status"] == "ready" and ready["pages"] == len(sizes)
        page = http.get("/pages/doc0001_1", params={"side": 200})
        with Image.open(io.BytesIO(page.content)) as im:
            assert page.headers["content-type"] == "image/jpeg" and max(im.size) == 200
        crop = http.get("/pages/doc0001_1", params={"box": "10,20,50,40", "side": 400})
        with Image.open(io.BytesIO(crop.content)) as im:
            assert im.size == (400, 200)  # a crop is shown enlarged
        assert http.get("/pages/nope_1").status_code == 404
        assert http.get("/pages/doc0001_1", params={"box": "5,5,1,1"}).status_code == 400
        corpus = http.get("/v1/corpus", params={"offset": 20, "limit": 10}).json()
        assert corpus["total"] == len(sizes) and len(corpus["pages"]) == len(sizes) - 20
        big = http.post("/v1/chat/completions", content=b"x" * (17 << 20), headers={"content-type": "application/json"})
        error = {"message": f"request body over {16 << 20} bytes", "type": "invalid_request_error", "param": None}
        assert big.status_code == 413 and big.json() == {"error": error | {"code": 413}}  # OpenAI's shape, as all
