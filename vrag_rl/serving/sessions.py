"""Many users' agent sessions on one engine, each a trajectory of the per-trajectory agent loop.

One scheduler thread runs an event loop that owns the agent loop (engine, encoder and retriever are not
re-entrant). Each live session is a coroutine on it (``AgentLoop.play``): its next turn joins the engine's running
batch as soon as its own previous turn and search are done, and the searches of concurrent sessions go to the
retriever in batches (``rollout/turns.py``), as a training batch's trajectories do. Each turn reaches the session's
client as an event (``serving.events``) as soon as it is taken, and a finished session gets its result. A session
that arrives while others are mid-way starts at once when a place is free: throughput grows with the number of
users.

Admission is bounded: ``max_live`` sessions run together and ``max_waiting`` more wait; ``submit`` refuses beyond
that with ``Busy`` (and a retry estimate from recent sessions). A session past its time limit (504), cancelled by
its client, or whose engine turn failed (an endpoint that is down: 502; a request the engine refused: 500) ends
alone, its turn under way taken out of the engine; the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import fmean

from PIL import Image

from vrag_rl.rollout.agent_loop import AgentLoop, AgentState
from vrag_rl.rollout.engine import REFUSED, SamplingConfig
from vrag_rl.rollout.records import Task
from vrag_rl.rollout.turns import BatchedSearch, EngineTurns, LoopTimings
from vrag_rl.serving.events import ErrorEvent, Event, PageSizes, image_search_event, result_event, turn_event

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    max_live: int = 16  # sessions under way together: the most turns the engine batches
    max_waiting: int = 32  # sessions queued beyond those; more are refused (HTTP 503)
    time_limit_s: float = 120.0  # per session, from its arrival
    image_top_k: int = 3  # search by image: the pages shown with the question
    keep_pages: int = 256  # pages kept decoded and encoded across sessions before the cache is dropped

    def __post_init__(self) -> None:
        if self.max_live < 1 or self.max_waiting < 0 or self.image_top_k < 1 or self.keep_pages < 1:
            raise ValueError("serve: max_live >= 1, max_waiting >= 0, image_top_k >= 1, keep_pages >= 1")
        if self.time_limit_s <= 0:
            raise ValueError(f"serve: time_limit_s must be > 0, got {self.time_limit_s}")


class Busy(RuntimeError):
    """Every live and waiting place is taken."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"busy: every place is taken; retry in about {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class Question:
    text: str
    image: Image.Image | None = None  # searched by image; its pages are shown with the question


Emit = Callable[[Event], None]  # called on the scheduler thread: must not block


@dataclass(eq=False)
class Session:
    id: str
    question: Question
    emit: Emit
    deadline: float  # time.monotonic()
    arrived: float = field(default_factory=time.monotonic)
    state: AgentState | None = None
    turns_sent: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_cancel: Callable[[], object] | None = None  # set once the session runs: cancels its coroutine

    def cancel(self) -> None:
        """The client went away: the session ends where it is, its turn under way taken out of the engine."""
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel()


class SessionScheduler:
    def __init__(
        self,
        loop: AgentLoop,
        sampling: SamplingConfig,
        cfg: SchedulerConfig = SchedulerConfig(),
        sizes: PageSizes | None = None,
    ):
        self.loop, self.sampling, self.cfg = loop, sampling, cfg
        self.sizes = sizes or {}
        self._waiting: deque[Session] = deque()
        self._live: list[Session] = []
        self._lock = threading.RLock()  # re-entrant: a caller may hold it to submit several sessions at once
        self._ids = itertools.count(1)
        self._recent: deque[float] = deque(maxlen=32)  # seconds of recently finished sessions
        self._closed = False
        self._ending: ErrorEvent | None = None  # what the sessions still under way are told when the loop stops
        self.timings = LoopTimings()  # engine steps, the requests in them and the turns they finished
        self.last_error: str | None = None  # the last engine failure, for readiness
        self._events: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="agent-sessions", daemon=True)
        self._thread.start()
        started.wait()

    def submit(self, question: Question, emit: Emit) -> Session:
        with self._lock:
            if self._closed or not self._thread.is_alive():
                raise RuntimeError("the session scheduler has stopped")
            if len(self._live) + len(self._waiting) >= self.cfg.max_live + self.cfg.max_waiting:
                raise Busy(self.retry_after_s())
            session = Session(f"s{next(self._ids)}", question, emit, time.monotonic() + self.cfg.time_limit_s)
            self._waiting.append(session)
        self._poke()
        return session

    def retry_after_s(self) -> int:
        typical = fmean(self._recent) if self._recent else self.cfg.time_limit_s / 4
        rounds = 1 + len(self._waiting) / self.cfg.max_live
        return max(1, math.ceil(typical * rounds))

    @property
    def load(self) -> tuple[int, int]:
        """(live, waiting) sessions."""
        with self._lock:
            return len(self._live), len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._ending = self._ending or ErrorEvent(503, "the server is shutting down")
        self._poke()
        self._thread.join(timeout=60)

    def _poke(self) -> None:
        """Wake the admitting coroutine, from any thread."""
        self._soon(lambda: self._wake.set())

    def _soon(self, call: Callable[[], object]) -> None:
        if self._events is None:  # the scheduler thread failed before its event loop ran
            return
        with contextlib.suppress(RuntimeError):  # the event loop has stopped
            self._events.call_soon_threadsafe(call)

    def _run(self, started: threading.Event) -> None:
        try:
            asyncio.run(self._serve(started))
        except Exception as err:  # a defect: readiness reports it (the sessions were told in _serve)
            log.exception("the session scheduler stopped")
            self.last_error = f"the session scheduler stopped: {type(err).__name__}: {err}"
        finally:
            started.set()

    async def _serve(self, started: threading.Event) -> None:
        """Admits waiting sessions while places are free, until closed; each session runs as a task of its own."""
        self._events, self._wake = asyncio.get_running_loop(), asyncio.Event()
        started.set()
        turns = EngineTurns(self.loop.engine, self.sampling, self.timings)
        searches = self.loop.batched_search(self.timings)
        tasks: set[asyncio.Task] = set()
        try:
            while not self._closed:
                for s in self._admit():
                    task = asyncio.create_task(self._session(s, turns, searches))
                    s.on_cancel = lambda task=task: self._soon(task.cancel)
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if not tasks:
                    self.loop.forget()  # idle: no page needs to stay decoded
                await self._wake.wait()
                self._wake.clear()
        except Exception as err:
            with self._lock:
                self._closed = True
                self._ending = ErrorEvent(500, f"the session scheduler stopped: {type(err).__name__}: {err}")
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for s in self._waiting:
                self._emit(s, self._ending)
            await turns.close()

    def _admit(self) -> list[Session]:
        """Waiting sessions moved in while places are free (those whose client left meanwhile dropped)."""
        with self._lock:
            free = self.cfg.max_live - len(self._live)
            new = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            new = [s for s in new if not s.cancelled.is_set()]
            self._live += new
        return new

    async def _session(self, s: Session, turns: EngineTurns, searches: BatchedSearch) -> None:
        try:
            async with asyncio.timeout_at(s.deadline):  # the event loop's clock is time.monotonic
                if await self._start(s, searches):
                    await self._converse(s, turns, searches)
        except TimeoutError:
            taken = s.state.rollout.num_turns if s.state is not None else 0
            self._emit(s, ErrorEvent(504, f"the time limit of {self.cfg.time_limit_s:g} s passed after {taken} turns"))
        except asyncio.CancelledError:  # the client left (told nothing more) or the scheduler stops
            if self._ending is not None:
                self._emit(s, self._ending)
        except Exception as err:  # the engine or the retriever failed: this session ends, the server goes on
            log.exception("session %s: a turn failed", s.id)
            self.last_error = f"{type(err).__name__}: {err}"
            self._emit(s, ErrorEvent(500, f"the agent's turn failed: {self.last_error}"))
        finally:
            with self._lock:
                self._live.remove(s)
            if self.loop.pages_kept > self.cfg.keep_pages:
                self.loop.forget()
            self._wake.set()

    async def _start(self, s: Session, searches: BatchedSearch) -> bool:
        """The session's first state (its question's image searched first); False if it ended already."""
        try:
            task = Task(s.id, s.question.text)
            if s.question.image is not None:
                by_image = self.loop.retriever.search_by_image
                hits = (await searches.alone(lambda: by_image([s.question.image], self.cfg.image_top_k)))[0]
                pages = tuple(h.page_id for h in hits)
                self._emit(s, image_search_event(list(pages), self.sizes))
                task = Task(s.id, s.question.text, context=pages)
            s.state = self.loop.start(task)
        except Exception as err:  # one bad session (an unreadable page, a retriever error) ends alone
            log.exception("session %s could not start", s.id)
            self._emit(s, ErrorEvent(500, f"the session could not start: {err}"))
            return False
        if s.state.done:  # the prompt alone is longer than max_length
            self._finish(s)
            return False
        return True

    async def _converse(self, s: Session, turns: EngineTurns, searches: BatchedSearch) -> None:
        """The session's turns, each sent as it is taken, then its result."""
        async with contextlib.aclosing(self.loop.play(s.state, turns, searches)) as taken:
            async for state in taken:
                rollout = state.rollout
                for i in range(s.turns_sent, rollout.num_turns):
                    self._emit(s, turn_event(rollout, i, self.sizes))
                s.turns_sent = rollout.num_turns
                if rollout.engine_errors:
                    self._engine_error(s, rollout.engine_errors[-1])
                    return
                if s.cancelled.is_set():
                    return
        self.last_error = None
        self._finish(s)

    def _engine_error(self, s: Session, error: str) -> None:
        if error.startswith(REFUSED):  # this session's request, not the engine: its detail stays in the log
            log.warning("session %s: %s", s.id, error)
            self._emit(s, ErrorEvent(500, "the engine could not take this session's turn"))
        else:
            self.last_error = error
            self._emit(s, ErrorEvent(502, f"the policy endpoint failed: {error}"))

    def _finish(self, s: Session) -> None:
        seconds = time.monotonic() - s.arrived
        self._recent.append(seconds)
        self._emit(s, result_event(s.state.rollout, seconds, self.sizes))

    def _emit(self, s: Session, event: Event) -> None:
        try:
            s.emit(event)
        except Exception:  # a client whose event loop is gone: it cannot be told anything more
            log.warning("session %s: an event could not be delivered; the session is dropped", s.id)
            s.cancel()
