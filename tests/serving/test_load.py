"""Load on 127.0.0.1, bounded in count and time: concurrent clients within capacity all get answers, and their
turns share engine steps; past capacity the surplus gets 503 with Retry-After and the server goes on."""

from concurrent.futures import ThreadPoolExecutor

import httpx
from serve_process import MAX_LIVE, MAX_WAITING

from vrag_rl.data.records import load_qa


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
    assert after["steps"] - before["steps"] < turns / 2  # on average more than two sessions per engine step


def test_past_capacity_the_surplus_gets_503_with_retry_after(agent_server, bundled_corpus):
    questions = [r.question for r in load_qa(bundled_corpus)[:8]] * 3  # 24 at once against 8 places
    replies = burst(agent_server.url, questions)
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {200, 503} and statuses.count(200) >= MAX_LIVE + MAX_WAITING
    refused = [r for r in replies if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["error"]["message"] for r in refused)
    assert httpx.get(agent_server.url + "/ready").json()["live"] == 0
    assert burst(agent_server.url, questions[:1])[0].status_code == 200  # the server went on
