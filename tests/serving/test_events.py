"""The serving events on the wire: typed values whose JSON is what the API has always sent (key for key, in order),
and holds every field the web page (``serving/web/app.js``) reads from it."""

import json
import re
from importlib.resources import files

from vrag_rl.agent.actions import ActionKind, parse_action
from vrag_rl.agent.trajectory import Segment, Trajectory
from vrag_rl.rollout.records import Rollout, StopReason, Task
from vrag_rl.serving.events import (
    Citation,
    ErrorEvent,
    ImageSearchEvent,
    ResultEvent,
    TurnEvent,
    View,
    image_search_event,
    result_event,
)

APP_JS = (files("vrag_rl.serving") / "web" / "app.js").read_text()
SIZES = {"doc0001_1": (800, 600, None), "talk_3": (320, 240, 6.0)}
TEXTS = [
    "<think>look it up</think><search>annual revenue</search>",
    "<think>zoom in</think><bbox>[10, 20, 50, 40]</bbox>",
    "no action here",
    "<think>so</think><answer>42 units</answer>",
]


def rollout() -> Rollout:
    """A search, a crop, an invalid turn and the answer, read from the crop."""
    segments = [Segment("prompt", [1, 2, 3]), Segment("model", [4, 5]), Segment("observation", [6])]
    return Rollout(
        task=Task("q1", "What was the revenue?"),
        trajectory=Trajectory(segments=segments + [Segment("model", [7])]),
        texts=TEXTS,
        actions=[parse_action(t) for t in TEXTS],
        retrieved_pages=["doc0001_1", "talk_3"],
        crops=[("doc0001_1", (10, 20, 50, 40))],
        views=[(0, "doc0001_1", None), (0, "talk_3", None), (1, "doc0001_1", (10, 20, 50, 40))],
        answer="42 units",
        num_invalid=1,
        stop_reason=StopReason.ANSWER,
    )


PAGE = {"page": "doc0001_1", "box": None, "width": 800, "height": 600, "url": "/pages/doc0001_1"}
FRAME = {"page": "talk_3", "box": None, "width": 320, "height": 240, "timestamp": 6.0, "url": "/pages/talk_3"}
CROP = PAGE | {"box": [10, 20, 50, 40], "crop_url": "/pages/doc0001_1?box=10,20,50,40"}
TURNS = [
    {"type": "turn", "turn": 1, "text": TEXTS[0], "think": "look it up", "action": "search", "query": "annual revenue"}
    | {"views": [PAGE, FRAME]},
    {"type": "turn", "turn": 2, "text": TEXTS[1], "think": "zoom in", "action": "bbox", "box": [10.0, 20.0, 50.0, 40.0]}
    | {"views": [CROP]},
    {"type": "turn", "turn": 3, "text": TEXTS[2], "think": None, "action": "invalid"}
    | {"reason": "no complete <search>, <bbox> or <answer> tag", "views": []},
    {"type": "turn", "turn": 4, "text": TEXTS[3], "think": "so", "action": "answer", "answer": "42 units", "views": []},
]
RESULT = {
    "type": "result",
    "answer": "42 units",
    "stop_reason": "answer",
    "citations": [
        PAGE | {"turn": 1, "last": False},
        FRAME | {"turn": 1, "last": False},
        CROP | {"turn": 2, "last": True},
    ],
    "turns": TURNS,
    "searches": 1,
    "crops": 1,
    "invalid_actions": 1,
    "usage": {"prompt_tokens": 3, "completion_tokens": 3},
    "seconds": 1.235,
}


def test_the_events_json_is_the_wire_format_key_for_key():
    result = result_event(rollout(), 1.23456, SIZES)
    assert json.dumps(result.to_json()) == json.dumps(RESULT)  # the same keys, in the same order
    assert json.dumps(image_search_event(["talk_3"], SIZES).to_json()) == json.dumps(
        {"type": "image_search", "views": [FRAME]}
    )
    assert ErrorEvent(504, "late").to_json() == {"type": "error", "status": 504, "message": "late"}
    assert [type(t) for t in result.turns] == [TurnEvent] * 4 and result.turns[1].box == [10.0, 20.0, 50.0, 40.0]
    assert result.citations[2] == Citation(View("doc0001_1", (10, 20, 50, 40), 800, 600), 2, True)


def keys(*events) -> set[str]:
    return {k for e in events for k in e.to_json()}


# What each event's JSON may hold, from events of every kind: a page and a video frame, crops, each action.
VIEW_KEYS = keys(View.of("talk_3", None, SIZES), View.of("doc0001_1", (1, 2, 3, 4), SIZES))
RESULT_EVENT = result_event(rollout(), 1.0, SIZES)
JSON_KEYS = {
    "View": VIEW_KEYS,
    "Citation": keys(*RESULT_EVENT.citations),
    "TurnEvent or ImageSearchEvent": keys(*RESULT_EVENT.turns, image_search_event(["talk_3"], SIZES)),
    "ResultEvent": keys(RESULT_EVENT),
}
# The page's functions that read serving JSON, and what each of their variables holds (``ask``'s ``event`` is the
# form's submit event, not ours).
READERS = {
    "label": {"view": "View"},
    "pageFigure": {"view": "View"},  # also given citations (a view with more keys)
    "viewFigures": {"view": "View"},
    "openViewer": {"view": "View"},
    "renderTurn": {"event": "TurnEvent or ImageSearchEvent"},
    "renderResult": {"result": "ResultEvent", "c": "Citation"},
    "loadCorpus": {"p": "View"},  # GET /v1/corpus lists views
}
WATCHED = {"view", "event", "result"}  # parameter names that hold our JSON in any function the page adds


def functions() -> dict[str, tuple[str, str]]:
    """app.js's top-level functions: name -> (parameters, body)."""
    found = re.finditer(r"^(?:async )?function (\w+)\(([^)]*)\) \{\n(.*?)^\}$", APP_JS, re.M | re.S)
    return {m.group(1): (m.group(2), m.group(3)) for m in found}


def test_every_field_the_page_reads_is_in_the_events_json():
    page = functions()
    assert set(READERS) <= set(page), f"app.js lost a function: {set(READERS) - set(page)}"
    for name, (params, _) in page.items():
        if name not in READERS and name != "ask":
            assert not WATCHED & {p.strip() for p in params.split(",")}, f"declare what {name}() reads in READERS"
    for name, variables in READERS.items():
        body = page[name][1]
        for var, holds in variables.items():
            read = set(re.findall(rf"(?<![\w.]){var}\.(\w+)", body))
            assert read, f"{name}() no longer reads {var}: update READERS"
            assert read <= JSON_KEYS[holds], f"app.js {name}() reads {sorted(read - JSON_KEYS[holds])} of {holds}"


def test_the_event_types_and_actions_the_page_tells_apart_are_ours():
    compared = set(re.findall(r"\.type === \"(\w+)\"", APP_JS))
    assert compared and compared <= {ImageSearchEvent.type, ResultEvent.type}  # the rest are turns
    shown = set(re.findall(r"^\s+(\w+): \(\) =>", functions()["renderTurn"][1], re.M))
    assert shown == {str(k) for k in ActionKind}
