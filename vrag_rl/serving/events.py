"""What a served agent session tells its client: one event per turn as it happens, then the result (JSON-ready).

- ``image_search``: the pages most like the question's image (search by image), shown with the question;
- ``turn``: one assistant turn: its thought, the action it took (search query, crop box, answer, or why it was
  invalid) and what that action showed (``views``: a page, or a crop of one with its box in the page's pixels);
- ``result``: the answer, why the session ended, its citations and the whole trajectory;
- ``error``: the session ended without a result (time limit, engine failure), with an HTTP status and why.

Citations are the pages and crops the answer rests on: every view shown, in order, the one looked at last before
answering marked ``last`` (``Rollout.cited_pages``, what evaluation scores against the gold pages). A single-turn
session (search by image) rests on the pages shown with the question.
"""

from __future__ import annotations

from urllib.parse import quote

from vrag_rl.agent.actions import ActionKind
from vrag_rl.rollout.agent_loop import Rollout

PageSizes = dict[str, tuple[int, int, float | None]]  # page id -> raw (width, height), a video frame's time


def view_json(page: str, box: tuple[int, int, int, int] | None, sizes: PageSizes) -> dict:
    """A page, or a crop of it (``box`` in the page's pixels), with links to both images (relative to the server) and,
    for a video frame, its time in the video (``timestamp``, seconds)."""
    width, height, timestamp = sizes.get(page, (0, 0, None))
    view = {"page": page, "box": None if box is None else list(box), "width": width, "height": height}
    if timestamp is not None:
        view["timestamp"] = timestamp
    view["url"] = f"/pages/{quote(page)}"
    if box is not None:
        view["crop_url"] = f"{view['url']}?box={','.join(map(str, box))}"
    return view


def image_search_event(pages: list[str], sizes: PageSizes) -> dict:
    return {"type": "image_search", "views": [view_json(p, None, sizes) for p in pages]}


def turn_event(rollout: Rollout, i: int, sizes: PageSizes) -> dict:
    """Turn ``i`` (0-based) of ``rollout``, after its observation was taken."""
    action = rollout.actions[i]
    event = {"type": "turn", "turn": i + 1, "text": rollout.texts[i], "think": action.think, "action": str(action.kind)}
    if action.kind == ActionKind.INVALID:
        event["reason"] = action.reason
    elif action.kind == ActionKind.BBOX:
        event["box"] = list(action.bbox)  # in the pixels of the image the model was shown
    else:
        event[{ActionKind.SEARCH: "query", ActionKind.ANSWER: "answer"}[action.kind]] = action.content
    event["views"] = [view_json(page, box, sizes) for turn, page, box in rollout.views if turn == i]
    return event


def citations(rollout: Rollout, sizes: PageSizes) -> list[dict]:
    """The views the answer rests on, each once, in the order shown; ``last`` marks what it was read from."""
    answered = rollout.answer is not None
    if rollout.task.context is not None:
        return [view_json(p, None, sizes) | {"turn": 0, "last": answered} for p in rollout.retrieved_pages]
    out, index = [], {}
    for turn, page, box in rollout.views:
        if (page, box) not in index:
            index[page, box] = len(out)
            out.append(view_json(page, box, sizes) | {"turn": turn + 1, "last": False})
    if answered and rollout.views:
        _, page, box = rollout.views[-1]
        out[index[page, box]]["last"] = True
    return out


def result_event(rollout: Rollout, seconds: float, sizes: PageSizes) -> dict:
    traj = rollout.trajectory
    completion = sum(traj.response_mask)
    return {
        "type": "result",
        "answer": rollout.answer,
        "stop_reason": str(rollout.stop_reason),
        "citations": citations(rollout, sizes),
        "turns": [turn_event(rollout, i, sizes) for i in range(rollout.num_turns)],
        "searches": rollout.num_searches,
        "crops": len(rollout.crops),
        "invalid_actions": rollout.num_invalid,
        "usage": {"prompt_tokens": traj.prompt_length, "completion_tokens": completion},
        "seconds": round(seconds, 3),
    }


def error_event(status: int, message: str) -> dict:
    return {"type": "error", "status": status, "message": message}
