"""Many users' agent sessions on one engine, batched turn by turn as a rollout batch is.

One scheduler thread owns the agent loop (engine, encoder and retriever are not re-entrant). Between turns it
admits waiting sessions, up to ``max_live``, then takes one ``AgentLoop.step`` over every live session: their
turns go to the engine in one generate call and their searches to the retriever in one batch. After the step each
session gets its new turn as an event (``serving.events``), and a finished one its result. A session that joins
while others are mid-way starts at the next turn boundary: throughput grows with the number of users.

Admission is bounded: ``max_live`` sessions step together and ``max_waiting`` more wait; ``submit`` refuses
beyond that with ``Busy`` (and a retry estimate from recent sessions). A session past its time limit, cancelled by
its client or whose engine turn failed (an endpoint that is down, a request the engine refused) leaves at the next
turn boundary with an error; the sessions stepped with it get their turns.
"""

from __future__ import annotations

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
from vrag_rl.serving.events import ErrorEvent, Event, PageSizes, image_search_event, result_event, turn_event

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    max_live: int = 16  # sessions stepped together: the engine's batch
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


@dataclass
class Session:
    id: str
    question: Question
    emit: Emit
    deadline: float  # time.monotonic()
    arrived: float = field(default_factory=time.monotonic)
    state: AgentState | None = None
    turns_sent: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client went away: the session leaves at the next turn boundary."""
        self.cancelled.set()


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
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._recent: deque[float] = deque(maxlen=32)  # seconds of recently finished sessions
        self._closed = False
        self.steps = 0  # batched turns taken, and the sessions in them: their ratio is the mean batch
        self.stepped = 0
        self.last_error: str | None = None  # the last engine failure, for readiness
        self._thread = threading.Thread(target=self._run, name="agent-sessions", daemon=True)
        self._thread.start()

    def submit(self, question: Question, emit: Emit) -> Session:
        with self._cond:
            if self._closed or not self._thread.is_alive():
                raise RuntimeError("the session scheduler has stopped")
            if len(self._live) + len(self._waiting) >= self.cfg.max_live + self.cfg.max_waiting:
                raise Busy(self.retry_after_s())
            session = Session(f"s{next(self._ids)}", question, emit, time.monotonic() + self.cfg.time_limit_s)
            self._waiting.append(session)
            self._cond.notify()
        return session

    def retry_after_s(self) -> int:
        typical = fmean(self._recent) if self._recent else self.cfg.time_limit_s / 4
        rounds = 1 + len(self._waiting) / self.cfg.max_live
        return max(1, math.ceil(typical * rounds))

    @property
    def load(self) -> tuple[int, int]:
        """(live, waiting) sessions."""
        with self._cond:
            return len(self._live), len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        try:
            while self._admit():
                self._leave_expired()
                if self._live:
                    self._step()
        except Exception as err:  # a defect: every session is told, and readiness reports it
            log.exception("the session scheduler stopped")
            self.last_error = f"the session scheduler stopped: {type(err).__name__}: {err}"
            with self._cond:
                self._closed, sessions = True, self._live + list(self._waiting)
            for s in sessions:
                self._emit(s, ErrorEvent(500, self.last_error))

    def _admit(self) -> bool:
        """Waits while there is nothing to do; moves waiting sessions in. False once closed."""
        with self._cond:
            while not self._closed and not self._waiting and not self._live:
                self.loop.forget()  # idle: no page needs to stay decoded
                self._cond.wait()
            if self._closed:
                for s in self._live + list(self._waiting):
                    self._emit(s, ErrorEvent(503, "the server is shutting down"))
                return False
            new = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.cfg.max_live - len(self._live)))]
        for s in new:
            if self._start(s):
                with self._cond:
                    self._live.append(s)
        return True

    def _start(self, s: Session) -> bool:
        try:
            task = Task(s.id, s.question.text)
            if s.question.image is not None:
                hits = self.loop.retriever.search_by_image([s.question.image], self.cfg.image_top_k)[0]
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

    def _leave_expired(self) -> None:
        now = time.monotonic()
        for s in list(self._live):
            if s.cancelled.is_set():
                self._remove(s)
            elif now > s.deadline:
                why = f"the time limit of {self.cfg.time_limit_s:g} s passed after {s.state.rollout.num_turns} turns"
                self._emit(s, ErrorEvent(504, why))
                self._remove(s)

    def _step(self) -> None:
        live = list(self._live)
        try:
            self.loop.step([s.state for s in live], self.sampling)
        except Exception as err:  # the engine or the retriever failed: the batch's sessions end, the server goes on
            log.exception("a batched turn of %d sessions failed", len(live))
            self.last_error = f"{type(err).__name__}: {err}"
            for s in live:
                self._emit(s, ErrorEvent(500, f"the agent's turn failed: {self.last_error}"))
                self._remove(s)
            return
        self.steps += 1
        self.stepped += len(live)
        for s in live:
            rollout = s.state.rollout
            for i in range(s.turns_sent, rollout.num_turns):
                self._emit(s, turn_event(rollout, i, self.sizes))
            s.turns_sent = rollout.num_turns
            if rollout.engine_errors:
                self._engine_error(s, rollout.engine_errors[-1])
            elif s.state.done:
                self.last_error = None
                self._finish(s)
                self._remove(s)
        if self.loop.pages_kept > self.cfg.keep_pages:
            self.loop.forget()

    def _engine_error(self, s: Session, error: str) -> None:
        if error.startswith(REFUSED):  # this session's request, not the engine: its detail stays in the log
            log.warning("session %s: %s", s.id, error)
            self._emit(s, ErrorEvent(500, "the engine could not take this session's turn"))
        else:
            self.last_error = error
            self._emit(s, ErrorEvent(502, f"the policy endpoint failed: {error}"))
        self._remove(s)

    def _finish(self, s: Session) -> None:
        seconds = time.monotonic() - s.arrived
        self._recent.append(seconds)
        self._emit(s, result_event(s.state.rollout, seconds, self.sizes))

    def _remove(self, s: Session) -> None:
        with self._cond:
            self._live.remove(s)

    def _emit(self, s: Session, event: Event) -> None:
        try:
            s.emit(event)
        except Exception:  # a client whose event loop is gone: it cannot be told anything more
            log.warning("session %s: an event could not be delivered; the session is dropped", s.id)
            s.cancel()
