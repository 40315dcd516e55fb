"""The session scheduler in-process, on the transformers engine (one request at a time, so batching cannot move a
result) and on a scripted engine that batches continuously: sessions that join mid-way sample what the agent loop
samples alone, a long turn holds up no other session; capacity, time limits, cancellation and a dead policy
endpoint end sessions with their reason, never the scheduler."""

import threading
import time

import pytest
from PIL import Image

from tests.rollout.conftest import TINY_BUDGET, ScriptedEngine, SteppedEngine
from vrag_rl.data.records import load_qa
from vrag_rl.retrieval.local import LocalRetriever
from vrag_rl.rollout.agent_loop import AgentConfig, AgentLoop
from vrag_rl.rollout.endpoint_engine import EndpointConfig, EndpointEngine
from vrag_rl.rollout.engine import SamplingConfig
from vrag_rl.rollout.hf_engine import HFEngine
from vrag_rl.rollout.records import Task
from vrag_rl.serving.events import ErrorEvent, Event, ImageSearchEvent, ResultEvent, TurnEvent
from vrag_rl.serving.sessions import Busy, Question, SchedulerConfig, SessionScheduler

SAMPLING = SamplingConfig(temperature=0.0, max_tokens=64)
AGENT = AgentConfig(max_turns=3, max_length=2048)


@pytest.fixture(scope="module")
def loop(warm_policy, encoder, bundled_corpus, bundled_index, embedder):
    retriever = LocalRetriever(bundled_corpus, bundled_index, embedder)
    return AgentLoop(HFEngine(str(warm_policy), "float32", "cpu"), encoder, retriever, AGENT)


class Collector:
    """Each session's events, in order; ``wait`` blocks until a session's last event (result or error)."""

    def __init__(self):
        self.events: dict[str, list[Event]] = {}
        self.ended: dict[str, threading.Event] = {}

    def emit_for(self, key: str):
        self.events[key], self.ended[key] = [], threading.Event()

        def emit(event: Event) -> None:
            self.events[key].append(event)
            if isinstance(event, (ResultEvent, ErrorEvent)):
                self.ended[key].set()

        return emit

    def wait(self, key: str, timeout: float = 120) -> Event:
        assert self.ended[key].wait(timeout), f"session {key} did not end: {self.events[key]}"
        return self.events[key][-1]


def run_alone(loop, question: str):
    return loop.run([Task("alone", question)], SAMPLING)[0]


def test_sessions_joining_mid_way_sample_what_the_loop_samples_alone(loop, bundled_corpus):
    questions = [r.question for r in load_qa(bundled_corpus)[:3]]
    alone = [run_alone(loop, q) for q in questions]
    scheduler = SessionScheduler(loop, SAMPLING, SchedulerConfig(max_live=4))
    got = Collector()
    try:
        scheduler.submit(Question(questions[0]), got.emit_for("0"))
        deadline = time.monotonic() + 60
        while not got.events["0"] and time.monotonic() < deadline:  # the others arrive while the first is under way
            time.sleep(0.01)
        for i, q in enumerate(questions[1:], start=1):
            scheduler.submit(Question(q), got.emit_for(str(i)))
        results = [got.wait(str(i)) for i in range(len(questions))]
    finally:
        scheduler.close()
    for i, (rollout, result) in enumerate(zip(alone, results)):
        assert isinstance(result, ResultEvent)
        assert [t.text for t in result.turns] == rollout.texts
        assert [e for e in got.events[str(i)] if isinstance(e, TurnEvent)] == result.turns  # streamed, then summed up
        assert result.answer == rollout.answer
    turns = sum(len(r.turns) for r in results)
    assert scheduler.timings.turns == turns and scheduler.timings.batched > scheduler.timings.steps  # shared steps


def test_over_capacity_submissions_are_refused_with_a_retry_estimate(loop, bundled_corpus):
    question = load_qa(bundled_corpus)[0].question
    scheduler = SessionScheduler(loop, SAMPLING, SchedulerConfig(max_live=1, max_waiting=1))
    got = Collector()
    try:
        scheduler.submit(Question(question), got.emit_for("a"))
        scheduler.submit(Question(question), got.emit_for("b"))
        with pytest.raises(Busy) as busy:
            scheduler.submit(Question(question), got.emit_for("c"))
        assert busy.value.retry_after_s >= 1
        assert isinstance(got.wait("a"), ResultEvent) and isinstance(got.wait("b"), ResultEvent)
        scheduler.submit(Question(question), got.emit_for("d"))  # room again
        assert isinstance(got.wait("d"), ResultEvent)
    finally:
        scheduler.close()


def test_a_session_past_its_time_limit_ends_with_504(loop, bundled_corpus):
    scheduler = SessionScheduler(loop, SAMPLING, SchedulerConfig(time_limit_s=0.05))
    got = Collector()
    try:
        scheduler.submit(Question(load_qa(bundled_corpus)[0].question), got.emit_for("late"))
        end = got.wait("late")
        assert isinstance(end, ErrorEvent) and end.status == 504 and "time limit" in end.message
        assert scheduler.alive and scheduler.load == (0, 0)
    finally:
        scheduler.close()


def test_a_cancelled_session_leaves_at_the_next_turn(loop, bundled_corpus):
    scheduler = SessionScheduler(loop, SAMPLING, SchedulerConfig())
    got = Collector()
    emit = got.emit_for("gone")
    session = None

    def cancel_on_first_turn(event):
        emit(event)
        session.cancel()

    try:
        session = scheduler.submit(Question(load_qa(bundled_corpus)[0].question), cancel_on_first_turn)
        done = got.emit_for("after")
        scheduler.submit(Question(load_qa(bundled_corpus)[1].question), done)
        assert isinstance(got.wait("after"), ResultEvent)  # the scheduler went on
        assert [type(e) for e in got.events["gone"]] == [TurnEvent] and scheduler.load == (0, 0)
    finally:
        scheduler.close()


def test_search_by_image_shows_its_pages_with_the_question(loop, bundled_corpus):
    scheduler = SessionScheduler(loop, SAMPLING, SchedulerConfig(image_top_k=2))
    got = Collector()
    with Image.open(bundled_corpus / "pages" / "doc0001_2.jpg") as im:
        image = im.convert("RGB")
    try:
        scheduler.submit(Question("What does this page report?", image), got.emit_for("img"))
        result = got.wait("img")
    finally:
        scheduler.close()
    first = got.events["img"][0]
    assert isinstance(first, ImageSearchEvent) and first.views[0].page == "doc0001_2" and len(first.views) == 2
    assert isinstance(result, ResultEvent) and len(result.turns) == 1
    assert [c.view for c in result.citations] == first.views


def test_a_dead_policy_endpoint_ends_the_session_with_502(loop, encoder, tiny_dirs, closed_port_url):
    cfg = EndpointConfig(base_url=closed_port_url, model="m", max_retries=0, timeout_s=2)
    dead = AgentLoop(EndpointEngine(str(tiny_dirs["policy"]), cfg), encoder, loop.retriever, AGENT)
    scheduler = SessionScheduler(dead, SAMPLING, SchedulerConfig())
    got = Collector()
    try:
        scheduler.submit(Question("Who founded Lagas Dynamics?"), got.emit_for("dead"))
        end = got.wait("dead")
        assert isinstance(end, ErrorEvent) and end.status == 502 and "policy endpoint failed" in end.message
        assert scheduler.alive and scheduler.last_error
    finally:
        scheduler.close()


def test_an_engine_failure_ends_its_own_session_and_no_other(encoder, bundled_corpus, bundled_index, embedder):
    """Two sessions' turns in one engine call; the engine fails on one's request: it ends with an error, the other
    gets its answer."""
    fine, failing = "Which city hosts the research centre?", "What share of the market does it hold?"
    engine = ScriptedEngine(encoder.tokenizer, {fine: ["<think>known</think><answer>Lyon</answer>"], failing: None})
    retriever = LocalRetriever(bundled_corpus, bundled_index, embedder)
    loop = AgentLoop(engine, encoder, retriever, AgentConfig(max_turns=2, max_length=2048, budget=TINY_BUDGET))
    scheduler = SessionScheduler(loop, SAMPLING, SchedulerConfig())
    got = Collector()
    try:
        with scheduler._lock:  # both wait when the scheduler next looks: their first turns share an engine step
            scheduler.submit(Question(fine), got.emit_for("fine"))
            scheduler.submit(Question(failing), got.emit_for("failing"))
        answered, failed = got.wait("fine"), got.wait("failing")
        assert scheduler.alive and scheduler.load == (0, 0)
    finally:
        scheduler.close()
    assert engine.batches[0] == 2
    assert isinstance(answered, ResultEvent) and answered.answer == "Lyon"
    assert isinstance(failed, ErrorEvent) and failed.status == 500 and "the engine cannot take" not in failed.message


def test_a_long_turn_holds_up_no_other_session_and_a_client_leaving_takes_its_turn_out(
    encoder, bundled_corpus, bundled_index, embedder
):
    """Three sessions at once on an engine that batches continuously: the two short ones end while the long one's
    first turn is still generating; its client then leaves and its turn is taken out of the engine."""
    short, long_, other = "Which city hosts the research centre?", "What share of the market does it hold?", "Who?"
    scripts = {
        short: ["<search>alpha report</search>", "<bbox>[0, 0, 50, 50]</bbox>", "<answer>Lyon</answer>"],
        long_: ["<think>a long thought</think><search>beta chart</search>", "<answer>12%</answer>"],
        other: ["<search>gamma</search>", "<answer>Ada</answer>"],
    }
    engine = SteppedEngine(encoder.tokenizer, scripts, {short: [1, 1, 1], long_: [1000, 1], other: [2, 2]})
    retriever = LocalRetriever(bundled_corpus, bundled_index, embedder)
    agent = AgentConfig(max_turns=3, max_length=4096, budget=TINY_BUDGET, search_mode="text")
    scheduler = SessionScheduler(AgentLoop(engine, encoder, retriever, agent), SAMPLING, SchedulerConfig())
    got = Collector()
    try:
        with scheduler._lock:
            sessions = {q: scheduler.submit(Question(q), got.emit_for(q)) for q in scripts}
        assert got.wait(short).answer == "Lyon" and got.wait(other).answer == "Ada"
        assert got.events[long_] == [] and engine.clock < 1000  # its first turn is still under way
        sessions[long_].cancel()
        deadline = time.monotonic() + 30
        while scheduler.load != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.load == (0, 0) and [(q, turn) for q, turn, _ in engine.aborted] == [(long_, 0)]
        assert got.events[long_] == [] and scheduler.alive
    finally:
        scheduler.close()
    assert engine.clock < 1000 and not any(q == long_ for q, _, _ in engine.finished)


def test_after_an_engine_failure_the_next_session_is_served(encoder, bundled_corpus, bundled_index, embedder):
    """The engine raises on one session's turn (a failure of the engine, not a refusal): that session ends with 500
    and the scheduler's next session gets its answer (the engine's driver starts again)."""
    question = "Which city hosts the research centre?"

    class FailsOnce(SteppedEngine):
        failed = False

        def advance(self, new, sampling):
            if new and not self.failed:
                self.failed = True
                raise RuntimeError("the engine died")
            return super().advance(new, sampling)

    engine = FailsOnce(encoder.tokenizer, {question: ["<answer>Lyon</answer>"]}, {question: [1]})
    retriever = LocalRetriever(bundled_corpus, bundled_index, embedder)
    agent = AgentConfig(max_turns=2, max_length=2048, budget=TINY_BUDGET, search_mode="text")
    scheduler = SessionScheduler(AgentLoop(engine, encoder, retriever, agent), SAMPLING, SchedulerConfig())
    got = Collector()
    try:
        scheduler.submit(Question(question), got.emit_for("first"))
        failed = got.wait("first")
        scheduler.submit(Question(question), got.emit_for("second"))
        answered = got.wait("second", timeout=30)
    finally:
        scheduler.close()
    assert isinstance(failed, ErrorEvent) and failed.status == 500 and "the engine died" in failed.message
    assert isinstance(answered, ResultEvent) and answered.answer == "Lyon"
