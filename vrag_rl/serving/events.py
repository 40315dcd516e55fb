"""What a served agent session tells its client: one event per turn as it happens, then the result.

Each event is a typed value whose ``to_json()`` is what the API sends (the ``vrag`` field of a reply or chunk) and
what the web page reads (``serving/web/app.js``); ``type`` names it on the wire:

- ``ImageSearchEvent`` (``image_search``): the pages most like the question's image (search by image), shown with
  the question;
- ``TurnEvent`` (``turn``): one assistant turn: its thought, the action it took (search ``query``, crop ``box``,
  ``answer``, or the ``reason`` it was invalid: only the one of its action is sent) and what that action showed
  (``views``: a page, or a crop of one with its box in the page's pixels);
- ``ResultEvent`` (``result``): the answer, why the session ended, its citations and the whole trajectory;
- ``ErrorEvent`` (``error``): the session ended without a result (time limit, engine failure), with an HTTP status
  and why.

Citations are the pages and crops the answer rests on: every view shown, in order, the one looked at last before
answering marked ``last`` (``Rollout.cited_pages``, what evaluation scores against the gold pages). A single-turn
session (search by image) rests on the pages shown with the question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import quote

from vrag_rl.agent.actions import ActionKind
from vrag_rl.rollout.records import Rollout

PageSizes = dict[str, tuple[int, int, float | None]]  # page id -> raw (width, height), a video frame's time
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class View:
    """A page, or a crop of it (``box`` in the page's pixels); a video frame has its time in the video (seconds)."""

    page: str
    box: Box | None
    width: int  # the page's raw size; 0 when unknown
    height: int
    timestamp: float | None = None

    @classmethod
    def of(cls, page: str, box: Box | None, sizes: PageSizes) -> View:
        width, height, timestamp = sizes.get(page, (0, 0, None))
        return cls(page, box, width, height, timestamp)

    @property
    def url(self) -> str:
        """The page image, relative to the server."""
        return f"/pages/{quote(self.page)}"

    @property
    def crop_url(self) -> str | None:
        return None if self.box is None else f"{self.url}?box={','.join(map(str, self.box))}"

    def to_json(self) -> dict:
        out = {"page": self.page, "box": None if self.box is None else list(self.box)}
        out |= {"width": self.width, "height": self.height}
        if self.timestamp is not None:
            out["timestamp"] = self.timestamp
        out["url"] = self.url
        if self.box is not None:
            out["crop_url"] = self.crop_url
        return out


@dataclass(frozen=True)
class Citation:
    view: View
    turn: int  # the turn that showed it (1-based); 0: shown with the question
    last: bool  # what the answer was read from

    def to_json(self) -> dict:
        return self.view.to_json() | {"turn": self.turn, "last": self.last}


@dataclass(frozen=True)
class ImageSearchEvent:
    type: ClassVar[str] = "image_search"
    views: list[View]

    def to_json(self) -> dict:
        return {"type": self.type, "views": [v.to_json() for v in self.views]}


# The field of a turn that holds what its action carries; only that one is sent.
ACTION_FIELD = {
    ActionKind.SEARCH: "query",
    ActionKind.BBOX: "box",
    ActionKind.ANSWER: "answer",
    ActionKind.INVALID: "reason",
}


@dataclass(frozen=True)
class TurnEvent:
    type: ClassVar[str] = "turn"
    turn: int  # 1-based
    text: str  # the turn as the model wrote it
    think: str | None
    action: ActionKind
    views: list[View]
    query: str | None = None
    box: list[float] | None = None  # in the pixels of the image the model was shown
    answer: str | None = None
    reason: str | None = None

    def to_json(self) -> dict:
        out = {"type": self.type, "turn": self.turn, "text": self.text, "think": self.think, "action": str(self.action)}
        key = ACTION_FIELD[self.action]
        out[key] = getattr(self, key)
        out["views"] = [v.to_json() for v in self.views]
        return out


@dataclass(frozen=True)
class ResultEvent:
    type: ClassVar[str] = "result"
    answer: str | None  # None: the agent stopped without answering (``stop_reason`` says why)
    stop_reason: str
    citations: list[Citation]
    turns: list[TurnEvent]
    searches: int
    crops: int
    invalid_actions: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float

    def to_json(self) -> dict:
        return {
            "type": self.type,
            "answer": self.answer,
            "stop_reason": self.stop_reason,
            "citations": [c.to_json() for c in self.citations],
            "turns": [t.to_json() for t in self.turns],
            "searches": self.searches,
            "crops": self.crops,
            "invalid_actions": self.invalid_actions,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class ErrorEvent:
    type: ClassVar[str] = "error"
    status: int  # the HTTP status the session ended with
    message: str

    def to_json(self) -> dict:
        return {"type": self.type, "status": self.status, "message": self.message}


Event = ImageSearchEvent | TurnEvent | ResultEvent | ErrorEvent


def image_search_event(pages: list[str], sizes: PageSizes) -> ImageSearchEvent:
    return ImageSearchEvent([View.of(p, None, sizes) for p in pages])


def turn_event(rollout: Rollout, i: int, sizes: PageSizes) -> TurnEvent:
    """Turn ``i`` (0-based) of ``rollout``, after its observation was taken."""
    action = rollout.actions[i]
    views = [View.of(page, box, sizes) for turn, page, box in rollout.views if turn == i]
    carried = {}
    if action.kind == ActionKind.INVALID:
        carried["reason"] = action.reason
    elif action.kind == ActionKind.BBOX:
        carried["box"] = list(action.bbox)
    else:
        carried[ACTION_FIELD[action.kind]] = action.content
    return TurnEvent(i + 1, rollout.texts[i], action.think, action.kind, views, **carried)


def citations(rollout: Rollout, sizes: PageSizes) -> list[Citation]:
    """The views the answer rests on, each once, in the order shown; ``last`` marks what it was read from."""
    answered = rollout.answer is not None
    if rollout.task.context is not None:
        return [Citation(View.of(p, None, sizes), 0, answered) for p in rollout.retrieved_pages]
    first: dict[tuple, int] = {}  # (page, box) -> the turn that first showed it
    for turn, page, box in rollout.views:
        first.setdefault((page, box), turn + 1)
    last = rollout.views[-1][1:] if answered and rollout.views else None
    return [Citation(View.of(page, box, sizes), turn, (page, box) == last) for (page, box), turn in first.items()]


def result_event(rollout: Rollout, seconds: float, sizes: PageSizes) -> ResultEvent:
    traj = rollout.trajectory
    return ResultEvent(
        answer=rollout.answer,
        stop_reason=str(rollout.stop_reason),
        citations=citations(rollout, sizes),
        turns=[turn_event(rollout, i, sizes) for i in range(rollout.num_turns)],
        searches=rollout.num_searches,
        crops=len(rollout.crops),
        invalid_actions=rollout.num_invalid,
        prompt_tokens=traj.prompt_length,
        completion_tokens=sum(traj.response_mask),
        seconds=round(seconds, 3),
    )
