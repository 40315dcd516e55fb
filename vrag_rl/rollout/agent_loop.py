"""The multi-turn search-and-crop agent, run for many trajectories at once.

Each trajectory alternates assistant turns and the observations its actions produce (docs/protocol.md). Two
loops drive them (``agent.loop``):

- "trajectories" (the default): every trajectory is a coroutine that takes its next turn as soon as its own
  previous turn, search and crop are done; the engine batches the turns under way continuously and searches of
  concurrent trajectories go to the retriever in batches (``rollout/turns.py``). A long turn holds up no one else;
  a turn or search past its time limit stops only the trajectories waiting for it (``StopReason.TIMEOUT``).
- "turns": one engine call generates the next turn of every live trajectory, then one search batch runs; the
  next turn starts when the batch's longest turn is done: the parity reference of the other loop.

Serving runs its users' sessions as trajectories of the first kind on one long-lived event loop (``play`` yields
each turn as it is taken; ``serving/sessions.py``).

Both act on a finished turn the same way:

- ``<search>``: the query goes to the retriever (``max_turns`` hits for every query, so a query's hits do not
  depend on its batch); the best-ranked page this trajectory has not been shown yet comes back, resized into
  the image budget, as an image-only user turn (a page the vision processor cannot take, such as a strip
  beyond its aspect-ratio limit, or an unreadable file, is passed over for the next one);
- ``<bbox>``: a region of the most recent image shown, in that image's pixel frame, is cut from the raw page and
  shown enlarged (a crop of a crop maps through the chain, see ``agent.images``); ``<answer>``: the end;
- anything else (no tag, bad box, a crop before any image) is an invalid action: the fixed feedback turn follows
  and the trajectory goes on. So is a turn the engine did not produce (an endpoint that failed, a request the
  engine refused: ``engine.generate_apart``), recorded in ``Rollout.engine_errors``; the others go on.

A single-turn task (``Task.context`` set: evaluation's vanilla RAG and direct baselines) shows the given pages
with the question in one user turn (``build_reference_messages``) and allows one turn, which may only answer.

After ``max_turns`` action turns, the last observation carries the answer-now instruction and one final turn may
only answer. A trajectory stops before a piece (a turn, an observation with its image) would pass ``max_length``:
pieces are appended whole, so an image is never cut. Sampled ids are recorded as sampled, with their log-probs
and the version of the weights that sampled them; text is decoded only to read the action.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from PIL import Image

from vrag_rl.agent.actions import ACTION_KINDS, Action, ActionKind, parse_action
from vrag_rl.agent.chat import ChatEncoder, EncodedImages
from vrag_rl.agent.images import ImageBudget, View, crop_view, fit_to_budget, page_view
from vrag_rl.agent.prompt import (
    ANSWER_NOW_FEEDBACK,
    INVALID_ACTION_FEEDBACK,
    PromptConfig,
    build_messages,
    build_reference_messages,
)
from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.retrieval.types import Hit, SearchMode
from vrag_rl.rollout.engine import Generation, GenerationRequest, RolloutEngine, SamplingConfig, generate_apart
from vrag_rl.rollout.records import Rollout, StopReason, Task, derive_seed
from vrag_rl.rollout.turns import BatchedSearch, EngineGate, EngineTurns, LoopTimings

log = logging.getLogger(__name__)
NO_NEW_PAGE_FEEDBACK = "The search found no page you have not seen yet. Try another query or answer."
ANSWER_ONLY = frozenset({ActionKind.ANSWER})  # the final turn's allowed actions
LOOPS = ("trajectories", "turns")


@dataclass
class AgentConfig:
    max_turns: int = 4  # action turns before the final answer-only turn
    max_length: int = 8192  # tokens per trajectory: prompt, turns and observations
    search_mode: str = SearchMode.VISUAL  # visual | text | hybrid (retrieval.types.SearchMode)
    crop_padding: float = 0.0  # fraction of the box added on each side before cropping
    max_query_chars: int = 1000  # a longer search query is cut to this before it reaches the retriever
    # "trajectories": each trajectory takes its next turn as soon as its own last one ended (continuous batching);
    # "turns": every live trajectory's turn in one engine call, then one search batch (the parity oracle)
    loop: str = "trajectories"
    search_window_s: float = 0.005  # trajectories: searches arriving this close together go as one batch
    search_batch: int = 64  # trajectories: at most this many queries per batch
    # trajectories: a turn or a search still unanswered after this stops its trajectory (StopReason.TIMEOUT)
    turn_timeout_s: float = 600.0
    search_timeout_s: float = 300.0
    budget: ImageBudget = field(default_factory=ImageBudget)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.max_length < 64:
            raise ValueError(f"agent: max_turns >= 1 and max_length >= 64, got {self.max_turns}, {self.max_length}")
        if not (0 <= self.crop_padding <= 1 and self.max_query_chars >= 1):
            raise ValueError("agent: crop_padding in [0, 1] and max_query_chars >= 1")
        self.search_mode = SearchMode.parse(self.search_mode, "agent.search_mode")
        if self.loop not in LOOPS:
            raise ValueError(f"agent.loop must be one of {LOOPS}, got {self.loop!r}")
        if self.search_window_s < 0 or self.search_batch < 1:
            raise ValueError("agent: search_window_s >= 0 and search_batch >= 1")
        if self.turn_timeout_s <= 0 or self.search_timeout_s <= 0:
            raise ValueError("agent: turn_timeout_s and search_timeout_s must be > 0")


@dataclass
class AgentState:
    """A trajectory under way: its rollout and what the next turn needs."""

    rollout: Rollout
    view: View | None = None  # the most recent image shown: a bbox refers to it
    done: bool = False
    pending: list[EncodedImages] = field(default_factory=list)  # images of the next observation
    new_page: str | None = None  # the page and the crop it shows: recorded once the observation fits
    new_crop: tuple[str, tuple[int, int, int, int]] | None = None
    notes: list[str] = field(default_factory=list)  # texts of the next observation
    close_turn: bool = False  # the last turn hit the token limit without <|im_end|>
    query: str | None = None  # this turn's search

    def stop(self, reason: StopReason) -> None:
        self.done, self.rollout.stop_reason = True, reason


class AgentLoop:
    """Runs tasks to completion with an engine and a retriever, which needs ``search(queries, top_k, mode) ->
    list[list[Hit]]`` and ``page_path(page_id)`` (``retrieval.local.LocalRetriever``, ``DistributedRetriever``,
    ``RemoteRetriever``)."""

    def __init__(self, engine: RolloutEngine, encoder: ChatEncoder, retriever, cfg: AgentConfig = AgentConfig()):
        self.engine, self.encoder, self.retriever, self.cfg = engine, encoder, retriever, cfg
        encoder.check_budget(cfg.budget.min_pixels, cfg.budget.max_pixels)
        self._pages: dict[str, Image.Image] = {}  # raw pages of the current run
        self._shown: dict[str, tuple[View, EncodedImages] | None] = {}  # per run; None: cannot be shown
        self.timings: dict[str, float] = {"generate_s": 0.0, "search_s": 0.0}
        self.version = 0  # of the engine's weights: the number of weight updates the job streamed into it
        self.gate = EngineGate()

    def update_weights(self, named_tensors, version: int, timeout_s: float) -> int:
        """New weights into the engine (``RolloutEngine.update_weights``) at a turn boundary of any batch running on
        another thread (``EngineGate``); the turns sampled after carry ``version``. Returns the bytes loaded."""
        self.gate.hold(timeout_s)
        try:
            nbytes = self.engine.update_weights(named_tensors)
            self.version = version
        finally:
            self.gate.release()
        return nbytes

    def run(self, tasks: list[Task], sampling: SamplingConfig) -> list[Rollout]:
        """Every task's rollout, in task order, by the configured loop (``agent.loop``); a weight update from
        another thread goes in at a turn boundary (``turns.EngineGate``)."""
        t0 = time.perf_counter()
        self.gate.enter()
        try:
            if self.cfg.loop == "turns":
                self.timings = {"generate_s": 0.0, "search_s": 0.0}
                states = [self.start(t) for t in tasks]
                while live := [s for s in states if not s.done]:
                    self.gate.pause_point()
                    self.step(live, sampling)
                rollouts = [s.rollout for s in states]
            else:
                rollouts = asyncio.run(self._run_trajectories(tasks, sampling))
        finally:
            self.gate.leave()
        self.forget()
        self.timings["total_s"] = time.perf_counter() - t0
        return rollouts

    async def _run_trajectories(self, tasks: list[Task], sampling: SamplingConfig) -> list[Rollout]:
        timings = LoopTimings()
        turns, searches = EngineTurns(self.engine, sampling, timings, self.gate), self.batched_search(timings)
        t0 = time.perf_counter()
        try:
            rollouts = await asyncio.gather(*(self._trajectory(t, turns, searches) for t in tasks))
        finally:
            await turns.close()
        self.timings = timings.as_dict(time.perf_counter() - t0)
        return list(rollouts)

    def batched_search(self, timings: LoopTimings) -> BatchedSearch:
        """The retriever behind asyncio, as ``agent`` configures it (``play``'s searches)."""
        c = self.cfg
        return BatchedSearch(
            self.retriever,
            c.search_mode,
            self.search_depth,
            c.search_window_s,
            c.search_batch,
            timings,
            c.search_timeout_s,
        )

    async def _trajectory(self, task: Task, turns: EngineTurns, searches: BatchedSearch) -> Rollout:
        """One trajectory from start to end: each turn as soon as its own previous turn and search are done."""
        s = self.start(task)
        async for _ in self.play(s, turns, searches):
            pass
        return s.rollout

    async def play(self, s: AgentState, turns: EngineTurns, searches: BatchedSearch) -> AsyncIterator[AgentState]:
        """Takes the turns of ``s`` (from ``start``) to its end, yielding it after each turn and its observation
        (serving streams them). A turn or search past its time limit stops it (``StopReason.TIMEOUT``)."""
        try:
            while not s.done and (request := self._request(s)) is not None:
                self._take_turn(s, await turns.generate(request, self.cfg.turn_timeout_s))
                if s.query is not None:
                    self._take_hits(s, await searches.search(s.query))
                if not s.done:
                    self._observe(s, final_next=s.rollout.num_turns == self.cfg.max_turns)
                yield s
        except TimeoutError as err:  # this trajectory ends here; the others go on
            log.warning("%s (task %s, sample %d): the trajectory stops", err, s.rollout.task.qid, s.rollout.task.sample)
            s.stop(StopReason.TIMEOUT)

    def step(self, live: list[AgentState], sampling: SamplingConfig) -> None:
        """One turn of every state in ``live`` (none done): one batched generate, one batched search, then each
        state's observation (the "turns" loop)."""
        asking = [(s, request) for s in live if (request := self._request(s)) is not None]
        t0 = time.perf_counter()
        generations = generate_apart(self.engine, [r for _, r in asking], sampling)  # a refusal fails alone
        self.timings["generate_s"] += time.perf_counter() - t0
        for (s, _), gen in zip(asking, generations):
            self._take_turn(s, gen)
        searching = [s for s, _ in asking if s.query is not None]
        if searching:
            t0 = time.perf_counter()
            queries = [s.query for s in searching]
            results = self.retriever.search(queries, top_k=self.search_depth, mode=self.cfg.search_mode)
            self.timings["search_s"] += time.perf_counter() - t0
            for s, hits in zip(searching, results):
                self._take_hits(s, hits)
        for s, _ in asking:
            if not s.done:
                self._observe(s, final_next=s.rollout.num_turns == self.cfg.max_turns)

    @property
    def search_depth(self) -> int:
        """Hits per search: a trajectory has seen at most ``max_turns - 1`` pages when it searches, so one of
        them is new. The same depth for every query keeps a query's hits independent of the batch it is in
        (a fused ranking's top can depend on the depth)."""
        return self.cfg.max_turns

    def forget(self) -> None:
        """Drop the raw and encoded pages kept since the last call (they are loaded again when needed)."""
        self._pages.clear()
        self._shown.clear()

    @property
    def pages_kept(self) -> int:
        return len(self._shown)

    def start(self, task: Task) -> AgentState:
        """A new trajectory's state, its prompt encoded (stopped at once if the prompt does not fit)."""
        traj = Trajectory(max_length=self.cfg.max_length)
        state = AgentState(Rollout(task, traj))
        if task.context is None:
            ids, enc = self.encoder.prompt(build_messages(task.question, self.cfg.prompt))
        else:
            shown = [(page, found) for page in task.context if (found := self._shown_page(page))]
            images = [im for _, (_, encoded) in shown for im in encoded.images]
            messages = build_reference_messages(task.question, len(images), self.cfg.prompt)
            ids, enc = self.encoder.prompt(messages, images)
            state.rollout.retrieved_pages = [page for page, _ in shown]
        if not traj.add_prompt(ids, enc.images, enc.pixel_values, enc.grids):
            state.rollout.retrieved_pages = []
            state.stop(StopReason.LENGTH)
        return state

    def _request(self, s: AgentState) -> GenerationRequest | None:
        """The state's next turn to generate; None (and the state stopped) when no token fits any more."""
        t = s.rollout.trajectory
        room = t.room()
        if room is not None and room < 1:
            s.stop(StopReason.LENGTH)
            return None
        turn = s.rollout.num_turns + 1
        seed = None if s.rollout.task.seed is None else derive_seed(s.rollout.task.seed, turn)
        return GenerationRequest(t.input_ids, list(t.images), list(t.pixel_values), list(t.image_grid_thw), room, seed)

    def _take_turn(self, s: AgentState, gen: Generation) -> None:
        """Record a generated turn and act on it."""
        final = s.rollout.num_turns + 1 > self.cfg.max_turns or s.rollout.task.context is not None
        s.query, s.close_turn = None, gen.finish_reason != "stop"
        r = s.rollout
        r.trajectory.add_model_turn(gen.token_ids, gen.logprobs)  # fits: the request asked for <= room tokens
        r.versions.append(self.version)
        if gen.error is not None:  # an empty turn: an invalid action below
            r.engine_errors.append(gen.error)
        text = self.encoder.tokenizer.decode(gen.token_ids, skip_special_tokens=False)
        action = parse_action(text, ANSWER_ONLY if final else ACTION_KINDS)
        r.texts.append(text)
        r.actions.append(action)
        self._act(s, action, final)

    def _act(self, s: AgentState, action: Action, final: bool) -> None:
        r = s.rollout
        if action.kind == ActionKind.ANSWER:
            r.answer = action.content
            s.stop(StopReason.ANSWER)
            return
        if action.kind == ActionKind.INVALID:
            r.num_invalid += 1
        if final:
            s.stop(StopReason.TURN_LIMIT)
        elif action.kind == ActionKind.SEARCH:
            s.query = action.content[: self.cfg.max_query_chars]
        elif action.kind == ActionKind.BBOX:
            result = (
                "crop before any image"
                if s.view is None
                else crop_view(s.view, action.bbox, self._page(s.view.page_id), self.cfg.budget, self.cfg.crop_padding)
            )
            if isinstance(result, str):
                r.num_invalid += 1
                s.notes.append(INVALID_ACTION_FEEDBACK)
            else:
                s.view, shown = result
                s.new_crop = (s.view.page_id, tuple(int(v) for v in s.view.region))
                s.pending.append(self.encoder.encode_images([shown]))
        else:
            s.notes.append(INVALID_ACTION_FEEDBACK)

    def _take_hits(self, s: AgentState, hits: list[Hit]) -> None:
        """Show the best-ranked page of ``hits`` this trajectory has not been shown (and that can be shown)."""
        seen = set(s.rollout.retrieved_pages)
        found = next((p for h in hits if h.page_id not in seen and (p := self._shown_page(h.page_id))), None)
        if found is None:
            s.notes.append(NO_NEW_PAGE_FEEDBACK)
            return
        s.view, encoded = found
        s.new_page = s.view.page_id
        s.pending.append(encoded)

    def _observe(self, s: AgentState, final_next: bool) -> None:
        notes = "\n".join(s.notes + ([ANSWER_NOW_FEEDBACK] if final_next else [])) or None
        ids, enc = self.encoder.observation(EncodedImages.join(s.pending), notes, close_turn=s.close_turn)
        fits = s.rollout.trajectory.add_observation(ids, enc.images, enc.pixel_values, enc.grids)
        if fits:  # what the model was shown: a page or crop that did not fit was never seen
            s.rollout.retrieved_pages += [s.new_page] if s.new_page else []
            s.rollout.crops += [s.new_crop] if s.new_crop else []
            turn = s.rollout.num_turns - 1
            s.rollout.views += [(turn, s.new_page, None)] if s.new_page else []
            s.rollout.views += [(turn, *s.new_crop)] if s.new_crop else []
        s.pending, s.notes, s.new_page, s.new_crop = [], [], None, None
        if not fits:
            s.stop(StopReason.LENGTH)

    def _shown_page(self, page_id: str) -> tuple[View, EncodedImages] | None:
        """A page's view and its image resized into the budget and encoded, once per run (a group's samples
        mostly find the same pages); None for a page that cannot be shown."""
        if page_id not in self._shown:
            b = self.cfg.budget
            try:
                raw = self._page(page_id)
                view = page_view(page_id, raw.size, b)
                encoded = self.encoder.encode_images([fit_to_budget(raw, b.min_pixels, b.max_pixels, b.factor)])
                self._shown[page_id] = view, encoded
            except (OSError, ValueError) as err:  # unreadable file; a shape the vision processor cannot take
                log.warning("page %s cannot be shown, passed over: %s", page_id, err)
                self._shown[page_id] = None
        return self._shown[page_id]

    def _page(self, page_id: str) -> Image.Image:
        if page_id not in self._pages:
            with Image.open(self.retriever.page_path(page_id)) as im:
                self._pages[page_id] = im.convert("RGB")
        return self._pages[page_id]
