"""The per-trajectory loop's machinery (``rollout/turns.py``): an engine that batches continuously, searches
gathered into batches, failures that end the run instead of hanging it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.rollout.conftest import TINY_BUDGET, SteppedEngine
from vrag_rl.rollout.agent_loop import AgentConfig, AgentLoop
from vrag_rl.rollout.engine import SamplingConfig
from vrag_rl.rollout.records import StopReason, Task
from vrag_rl.rollout.scoring import process_counts, process_rates
from vrag_rl.rollout.turns import BatchedSearch, EngineGate

Q1, Q2, Q3 = "Which city hosts the research centre?", "What share of the market does it hold?", "Who leads it?"
GREEDY = SamplingConfig(temperature=0.0, max_tokens=256)
SCRIPTS = {
    Q1: ["<search>alpha report</search>", "<bbox>[0, 0, 50, 50]</bbox>", "<answer>Lyon</answer>"],
    Q2: ["<think>a long thought</think><search>beta chart</search>", "<answer>12%</answer>"],
    Q3: ["<search>gamma</search>", "<answer>Ada</answer>"],
}
STEPS = {Q1: [1, 1, 1], Q2: [50, 1], Q3: [2, 2]}  # Q2's first turn is 25 to 50 times longer than the rest
TASKS = [Task("q1", Q1), Task("q2", Q2), Task("q3", Q3)]


def loop(engine, encoder, retriever, **agent) -> AgentLoop:
    return AgentLoop(engine, encoder, retriever, AgentConfig(budget=TINY_BUDGET, max_length=4096, **agent))


def test_a_long_turn_holds_up_no_other_trajectory_and_both_loops_agree(tiny_processor, encoder, retriever):
    engine = SteppedEngine(tiny_processor.tokenizer, SCRIPTS, STEPS)
    rollouts = loop(engine, encoder, retriever, search_mode="text").run(TASKS, GREEDY)  # BM25: milliseconds
    order = [(q, turn) for q, turn, _ in engine.finished]
    # Q1 and Q3 ran every turn while Q2's first turn was still generating.
    assert order.index((Q1, 2)) < order.index((Q2, 0)) and order.index((Q3, 1)) < order.index((Q2, 0))
    assert max(step for q, _, step in engine.finished if q != Q2) < 50
    assert [r.answer for r in rollouts] == ["Lyon", "12%", "Ada"]

    same = loop(
        SteppedEngine(tiny_processor.tokenizer, SCRIPTS, STEPS), encoder, retriever, search_mode="text", loop="turns"
    )
    for got, want in zip(rollouts, same.run(TASKS, GREEDY)):
        assert got.texts == want.texts and got.retrieved_pages == want.retrieved_pages and got.crops == want.crops
        assert got.trajectory.input_ids == want.trajectory.input_ids and got.views == want.views


def test_a_refused_request_fails_alone(tiny_processor, encoder, retriever):
    scripts = {**SCRIPTS, Q3: None}
    engine = SteppedEngine(tiny_processor.tokenizer, scripts, STEPS)
    r1, r2, r3 = loop(engine, encoder, retriever, max_turns=2).run(TASKS, GREEDY)
    assert r1.answer == "Lyon" and r2.answer == "12%"
    assert r3.engine_errors and r3.engine_errors[0].startswith("the engine refused the request") and not r3.finished


def test_searches_of_concurrent_trajectories_go_as_batches(tiny_processor, encoder, retriever):
    """Four trajectories search in the same engine step: one batch of four within the window, two of two at
    ``search_batch=2``; the loop's timings report the batch size."""
    scripts = {f"Question number {k}?": ["<search>alpha report</search>", "<answer>x</answer>"] for k in range(4)}
    steps = {q: [1, 1] for q in scripts}
    tasks = [Task(f"q{k}", q) for k, q in enumerate(scripts)]
    for batch, want in ((64, 4.0), (2, 2.0)):
        agent = loop(SteppedEngine(tiny_processor.tokenizer, scripts, steps), encoder, retriever, search_batch=batch)
        rollouts = agent.run(tasks, GREEDY)
        assert agent.timings["search_batch"] == want and all(r.retrieved_pages for r in rollouts)
        assert 0 < agent.timings["engine_busy"] <= 1


def test_an_engine_or_retriever_failure_ends_the_run(tiny_processor, encoder, retriever):
    class Broken(SteppedEngine):
        def advance(self, new, sampling):
            if self.clock == 2:
                raise RuntimeError("the engine died")
            return super().advance(new, sampling)

    with pytest.raises(RuntimeError, match="the engine died"):
        loop(Broken(tiny_processor.tokenizer, SCRIPTS, STEPS), encoder, retriever).run(TASKS, GREEDY)

    class Unreachable:
        def search(self, queries, top_k, mode):
            raise ConnectionError("the retriever is gone")

    engine = SteppedEngine(tiny_processor.tokenizer, SCRIPTS, STEPS)
    with pytest.raises(ConnectionError, match="the retriever is gone"):
        loop(engine, encoder, Unreachable()).run(TASKS, GREEDY)


def test_a_turn_that_takes_too_long_stops_its_own_trajectory_only(tiny_processor, encoder, retriever):
    """Q2's first turn would run 500 engine steps (10 s); at a 0.5 s turn limit it is taken out of the engine and
    Q2 stops on a timeout, while Q1 and Q3 take every turn they would have."""
    engine = SteppedEngine(tiny_processor.tokenizer, SCRIPTS, {**STEPS, Q2: [500, 1]})
    r1, r2, r3 = loop(engine, encoder, retriever, search_mode="text", turn_timeout_s=0.5).run(TASKS, GREEDY)
    assert r2.stop_reason == StopReason.TIMEOUT and r2.num_turns == 0 and not r2.finished
    assert [(q, turn) for q, turn, _ in engine.aborted] == [(Q2, 0)] and engine.running == 0
    assert engine.clock < 100  # the run ended long before the turn would have
    assert (r1.answer, r3.answer) == ("Lyon", "Ada") and (r1.stop_reason, r3.stop_reason) == ("answer", "answer")
    assert process_rates([process_counts(r) for r in (r1, r2, r3)])["timeout_rate"] == 1 / 3  # train/timeout_rate


def test_a_search_that_hangs_stops_its_own_trajectory_and_the_next_searches_go_out(tiny_processor, encoder, retriever):
    """Q3's search (step 10, alone in its batch) never returns until the test ends; at a 0.3 s search limit Q3
    stops on a timeout, and Q2's search (step 50, most of a second later) still goes to the retriever."""
    release, sent = threading.Event(), []

    class HangsOnGamma:
        def search(self, queries, top_k, mode):
            sent.append(list(queries))
            if "gamma" in queries:
                release.wait(timeout=60)
            return retriever.search(queries, top_k=top_k, mode=mode)

        def page_path(self, page_id):
            return retriever.page_path(page_id)

    engine = SteppedEngine(tiny_processor.tokenizer, SCRIPTS, {**STEPS, Q3: [10, 2]})
    agent = loop(engine, encoder, HangsOnGamma(), search_mode="text", search_timeout_s=0.3)
    try:
        r1, r2, r3 = agent.run(TASKS, GREEDY)
    finally:
        release.set()
    assert r3.stop_reason == StopReason.TIMEOUT and r3.num_turns == 1 and not r3.retrieved_pages
    assert sent == [["alpha report"], ["gamma"], ["beta chart"]]
    assert (r1.answer, r2.answer) == ("Lyon", "12%") and r1.retrieved_pages


def test_batched_search_waits_for_its_window_and_sends_at_most_max_batch():
    calls: list[list[str]] = []

    class Recorder:
        def search(self, queries, top_k, mode):
            calls.append(list(queries))
            return [[f"{q}-{k}" for k in range(top_k)] for q in queries]

    async def main():
        search = BatchedSearch(Recorder(), "text", top_k=2, window_s=0.05, max_batch=3)
        first = asyncio.gather(*(search.search(f"q{k}") for k in range(2)))
        await asyncio.sleep(0.01)  # within the window: these join the first batch
        rest = asyncio.gather(*(search.search(f"q{k}") for k in range(2, 7)))
        return await first, await rest

    first, rest = asyncio.run(main())
    assert calls == [["q0", "q1", "q2"], ["q3", "q4", "q5"], ["q6"]]
    assert first[0] == ["q0-0", "q0-1"] and rest[-1] == ["q6-0", "q6-1"]


def test_a_weight_update_under_a_running_batch_waits_for_the_turns_under_way(tiny_processor, encoder, retriever):
    """Another thread holds the engine while Q2's long first turn runs: no new turn starts, the turns under way
    finish with the old weights, then the update goes in with nothing running and the next turns carry its
    version."""
    engine = SteppedEngine(tiny_processor.tokenizer, SCRIPTS, {**STEPS, Q3: [30, 30]})
    agent = loop(engine, encoder, retriever, search_mode="text")
    seen = {}

    def update():
        while engine.clock < 3:  # the batch is under way
            time.sleep(0.001)
        agent.gate.hold(timeout_s=30)
        seen.update(running=engine.running, clock=engine.clock)
        agent.version = 1
        agent.gate.release()

    thread = threading.Thread(target=update)
    thread.start()
    r1, r2, r3 = agent.run(TASKS, GREEDY)
    thread.join()
    # Q3's second turn, asked for at step 31, waited: the update went in when Q2's 50-step first turn ended.
    assert seen == {"running": 0, "clock": 50}
    assert r2.versions == r3.versions == [0, 1] and [r.answer for r in (r1, r2, r3)] == ["Lyon", "12%", "Ada"]


def test_the_gate_hands_over_only_at_pause_points():
    gate = EngineGate()
    gate.enter()  # a batch runs and reaches no pause point
    with pytest.raises(TimeoutError, match="turn boundary"):
        gate.hold(timeout_s=0.05)
    holder = threading.Thread(target=lambda: (gate.hold(timeout_s=5), time.sleep(0.05), gate.release()))
    holder.start()
    while not gate.wanted:
        time.sleep(0.001)
    t0 = time.perf_counter()
    gate.pause_point()  # hands over, and returns once the holder released
    assert time.perf_counter() - t0 >= 0.04
    holder.join()
    gate.pause_point()  # nobody wants it: returns at once
    gate.leave()
    gate.hold(timeout_s=0.05)  # no batch: at once
    gate.release()
