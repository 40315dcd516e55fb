"""The engine and the retriever behind asyncio, for the per-trajectory agent loop (``agent_loop.AgentLoop.run``).

``EngineTurns``: a trajectory awaits its own next turn (``await turns.generate(request)``); one driver task
advances the engine (``RolloutEngine.advance``) while any request is waiting or running, adding the requests that
arrived since its last step, and after each step lets the trajectories whose turns finished act (parse, crop,
encode, ask for their next turn or search) before the next step. Engine steps and the agent's own work
alternate on the event loop's thread rather than overlap: on 2 CPU cores, running the engine on a second thread
made each step take about twice as long (the two threads' Python work contends for the interpreter lock and the
cores the engine's kernels use), more than the overlap gained. Only that thread touches the engine.

vLLM's ``AsyncLLM`` would give the same per-request interface, but it always runs the engine core in a process of
its own (vLLM 0.32: ``make_async_mp_client``), so a weight update would be pickled across a socket instead of
streamed into the model in place (``vllm_engine.py``). The in-process engine's own request queue and scheduler
step (``LLM.enqueue``, ``LLMEngine.step``) are what ``AsyncLLM``'s output loop drives.

``EngineGate``: a weight update that arrives while a batch runs (``rollout.partial``) takes the engine at a turn
boundary: the driver stops admitting new turns, steps until the turns under way are done, and hands the engine
over; the trajectories' next turns sample with the new weights. A turn is never sampled by two versions, and no
cached prefix from the old weights is reused (the engine resets its caches with nothing running).

``BatchedSearch``: a trajectory awaits its own search; queries arriving within ``window_s`` of the first waiting
one (or ``max_batch`` of them) go to the retriever as one batch, on a worker thread, so that the retriever still
sees batches; one batch runs at a time, and queries that arrive meanwhile go next. Another use of the retriever
(serving's search by image, ``alone``) takes its turn between batches.

Timeouts are per trajectory: a turn still unfinished after ``agent.turn_timeout_s`` is taken out of the engine
(``RolloutEngine.abort``) and a search batch unanswered after ``agent.search_timeout_s`` is left behind on its
thread; only the trajectories waiting for them stop (``StopReason.TIMEOUT``), the others go on and the next search
batch goes out. A trajectory cancelled while it waits (a served session whose client left) takes its turn out of
the engine the same way. A turn can only time out between engine steps: an engine step that never returns is the
rollout worker's timeout (``rollout.call_timeout_s``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from vrag_rl.retrieval.types import Hit
from vrag_rl.rollout.engine import Generation, GenerationRequest, RolloutEngine, SamplingConfig

T = TypeVar("T")


@dataclass
class LoopTimings:
    """Where a run of the per-trajectory loop spent its time (seconds; the parts overlap in time)."""

    engine_s: float = 0.0  # the engine advancing (the driver's calls)
    search_s: float = 0.0  # batched searches running
    searches: int = 0  # search batches sent
    queries: int = 0  # queries in them
    steps: int = 0  # engine steps
    batched: int = 0  # requests in them, summed: over ``steps``, the engine's mean batch
    turns: int = 0  # turns the engine finished

    def as_dict(self, total_s: float) -> dict[str, float]:
        """The run's timings as ``AgentLoop.timings`` reports them."""
        busy = self.engine_s / total_s if total_s > 0 else 0.0
        return {
            "generate_s": self.engine_s,
            "search_s": self.search_s,
            "total_s": total_s,
            "engine_busy": busy,
            "search_batch": self.queries / max(self.searches, 1),
        }


class EngineGate:
    """The engine, shared by the thread that runs batches and one that updates weights under them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False  # a batch is using the engine (outside its pause points)
        self._held = False  # the updating thread holds the engine
        self._wanted = 0
        self.waker: Callable[[], object] | None = None  # wakes an idle driver (EngineTurns)

    @property
    def wanted(self) -> bool:
        return self._wanted > 0

    def enter(self) -> None:
        """A batch starts (after any update under way)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._held)
            self._busy = True

    def leave(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def pause_point(self) -> None:
        """The batch's thread, with no turn under way: hand the engine over if an update wants it."""
        with self._cond:
            if not self._wanted:
                return
            self._busy = False
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._held and not self._wanted)
            self._busy = True

    def hold(self, timeout_s: float) -> None:
        """The updating thread: wait until the batch is at a pause point (or none runs), then hold the engine."""
        with self._cond:
            self._wanted += 1
        if self.waker is not None:
            self.waker()
        with self._cond:
            free = self._cond.wait_for(lambda: not self._busy and not self._held, timeout_s)
            self._wanted -= 1
            if not free:
                self._cond.notify_all()
                raise TimeoutError(f"the running batch reached no turn boundary in {timeout_s}s")
            self._held = True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()


@dataclass
class EngineTurns:
    """Per-request turns from one engine, for the coroutines of one event loop."""

    engine: RolloutEngine
    sampling: SamplingConfig
    timings: LoopTimings = field(default_factory=LoopTimings)
    gate: EngineGate = field(default_factory=EngineGate)

    def __post_init__(self) -> None:
        self._new: list[tuple[asyncio.Future, GenerationRequest]] = []
        self._waiting: set[asyncio.Future] = set()  # every trajectory waiting for a turn
        self._wake = asyncio.Event()
        self._driver: asyncio.Task | None = None

    async def generate(self, request: GenerationRequest, timeout_s: float | None = None) -> Generation:
        """This request's turn, once the engine finished it; ``TimeoutError`` after ``timeout_s``, the request
        then taken out of the engine."""
        loop = asyncio.get_running_loop()
        if self._driver is None or self._driver.done():  # the first turn, or the first since an engine failure
            self.gate.waker = lambda: loop.call_soon_threadsafe(self._wake.set)
            self._driver = asyncio.create_task(self._drive())
        future = loop.create_future()
        self._new.append((future, request))
        self._waiting.add(future)
        self._wake.set()
        # A timer rather than asyncio.wait_for: the turn must reach its trajectory in the loop iteration it ends
        # in, before the driver can hand the engine to a weight update (the turn's version is read then).
        timer = None if timeout_s is None else loop.call_later(timeout_s, self._expire, future, timeout_s)
        try:
            return await future
        except asyncio.CancelledError:  # the trajectory was cancelled (a client that left): its turn goes too
            self._drop(future)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            self._waiting.discard(future)

    def _expire(self, future: asyncio.Future, timeout_s: float) -> None:
        if not future.done():
            self._drop(future)
            future.set_exception(TimeoutError(f"a turn took longer than {timeout_s}s"))

    def _drop(self, future: asyncio.Future) -> None:
        """Take an unfinished turn out: not yet added, or out of the engine (the driver runs on this thread, so it
        is between steps now)."""
        self._new = [(f, r) for f, r in self._new if f is not future]
        self.engine.abort(future)

    async def _drive(self) -> None:
        while True:
            if self.gate.wanted and not self.engine.running:
                self.gate.pause_point()  # the turns under way are done: a weight update goes in here
            admit = not self.gate.wanted  # while one waits, the turns under way finish and no new one starts
            if not (self._new and admit) and not self.engine.running:
                self._wake.clear()
                await self._wake.wait()
                continue
            new, self._new = (self._new, []) if admit else ([], self._new)
            self.timings.batched += self.engine.running + len(new)
            t0 = time.perf_counter()
            try:
                done = self.engine.advance(new, self.sampling)
            except Exception as err:  # the engine failed: every waiting trajectory fails with it
                for future in self._waiting:
                    if not future.done():
                        future.set_exception(err)
                return
            self.timings.engine_s += time.perf_counter() - t0
            self.timings.steps += 1
            self.timings.turns += len(done)
            for future, generation in done:
                if not future.done():  # a trajectory that gave up (cancelled) no longer waits
                    future.set_result(generation)
            await asyncio.sleep(0)  # the trajectories whose turns finished act before the next step

    async def close(self) -> None:
        """Stop the driver (after every trajectory has its turns)."""
        self.gate.waker = None
        if self._driver is not None:
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)


@dataclass
class BatchedSearch:
    """Searches of concurrent trajectories, gathered into batches."""

    retriever: object  # search(queries, top_k, mode) -> list[list[Hit]]
    mode: str
    top_k: int
    window_s: float = 0.005
    max_batch: int = 64
    timings: LoopTimings = field(default_factory=LoopTimings)
    timeout_s: float | None = None  # a batch not answered by then fails its trajectories with TimeoutError

    def __post_init__(self) -> None:
        self._waiting: list[tuple[str, asyncio.Future]] = []
        self._window: asyncio.Task | None = None
        self._busy = False  # a batch is out: queries arriving meanwhile go in the next one
        self._one = asyncio.Lock()  # one retriever call at a time: a retriever need not take concurrent calls

    async def search(self, query: str) -> list[Hit]:
        """The ``top_k`` best hits of ``query``."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((query, future))
        if not self._busy and len(self._waiting) >= self.max_batch:
            self._send()
        elif not self._busy and self._window is None:
            self._window = asyncio.create_task(self._send_after_window())
        return await future

    async def _send_after_window(self) -> None:
        await asyncio.sleep(self.window_s)
        self._window = None
        if not self._busy:
            self._send()

    def _send(self) -> None:
        if self._window is not None:
            self._window.cancel()
            self._window = None
        batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
        self._busy = True
        asyncio.create_task(self._run(batch))

    async def _run(self, batch: list[tuple[str, asyncio.Future]]) -> None:
        try:
            await self._search(batch)
        finally:
            self._busy = False
            if self._waiting:  # they arrived during this search and have waited long enough
                self._send()

    async def alone(self, call: Callable[[], T]) -> T:
        """``call()``, another use of the retriever (a search by image), on a thread between batches: the retriever
        takes one call at a time. ``TimeoutError`` after ``timeout_s``."""
        async with self._one:
            return await self._call(call)

    async def _search(self, batch: list[tuple[str, asyncio.Future]]) -> None:
        queries = [q for q, _ in batch]
        try:
            async with self._one:
                t0 = time.perf_counter()
                results = await self._call(lambda: self.retriever.search(queries, top_k=self.top_k, mode=self.mode))
        except Exception as err:  # noqa: BLE001 (the batch's trajectories fail with the retriever's error)
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        self.timings.search_s += time.perf_counter() - t0
        self.timings.searches += 1
        self.timings.queries += len(batch)
        for (_, future), hits in zip(batch, results):
            if not future.done():
                future.set_result(hits)

    async def _call(self, call: Callable[[], T]) -> T:
        try:
            return await asyncio.wait_for(self._on_thread(call), self.timeout_s)
        except TimeoutError:
            raise TimeoutError(f"a search took longer than {self.timeout_s}s") from None

    def _on_thread(self, call: Callable[[], T]) -> asyncio.Future:
        """``call()``'s answer, from a daemon thread: a search that hangs is left behind (after ``timeout_s``)
        without holding up the next batches or the end of the run."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()

        def settle(result, err) -> None:
            if answer.done():  # timed out
                return
            if err is not None:
                answer.set_exception(err)
            else:
                answer.set_result(result)

        def run() -> None:
            result, error = None, None
            try:
                result = call()
            except Exception as err:  # noqa: BLE001 (handed to the waiting trajectories)
                error = err
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the run has ended (its event loop is closed)
                pass

        threading.Thread(target=run, name="search", daemon=True).start()
        return answer
