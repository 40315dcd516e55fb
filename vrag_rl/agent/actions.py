"""Parse one assistant turn into the single action it takes.

Grammar and decisions (the parser never raises on any text and runs in linear time):
- Action tags are ``<search>…</search>``, ``<bbox>…</bbox>`` and ``<answer>…</answer>``, lowercase and
  case-sensitive. One action per turn: the complete tag pair that *starts first* wins; anything after
  it is ignored.
- A tag pair runs from an opening tag to the next matching closing tag. An opening tag with no
  closing tag after it is skipped, so a later complete tag can still win; a turn with no complete
  tag is invalid.
- Nesting: the winning pair's content must not contain any other protocol tag (action or think,
  opening or closing): ``<search><answer>x</answer></search>`` and ``<search>a <search>b</search>``
  are invalid.
- ``<think>…</think>`` blocks (an opening tag to the next ``</think>``) are reasoning, not actions:
  action tags inside a complete think block are ignored. ``Action.think`` is the stripped text of the
  first such block. An unclosed ``<think>`` hides nothing.
- Content is stripped; an empty search query or answer is invalid.
- A bbox is exactly ``[x1, y1, x2, y2]``: square brackets required, four comma-separated ASCII
  decimal numbers (ints, decimals or exponent notation), whitespace allowed around every element.
  NaN, infinities (including overflow such as ``1e309``), other arity, other characters, and
  x2 <= x1 or y2 <= y1 are invalid. Negative or huge finite coordinates pass: the crop geometry
  clamps them to the image and rejects boxes wholly outside it.
- An action whose kind is not in ``allowed`` (e.g. a search in the final answer-only turn) is invalid.
- Trailing end-of-turn tokens (``<|im_end|>``, ``<|endoftext|>``) and whitespace are ignored.
"""

import math
import re
from dataclasses import dataclass

from vrag_rl.choice import Choice


class ActionKind(Choice):
    SEARCH = "search"
    BBOX = "bbox"
    ANSWER = "answer"
    INVALID = "invalid"  # no well-formed action: counted, answered by the feedback turn


ACTION_KINDS = frozenset({ActionKind.SEARCH, ActionKind.BBOX, ActionKind.ANSWER})  # the kinds a turn can take
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")

_OPENING = re.compile(r"<(think|search|bbox|answer)>")  # alternation of literals: no backtracking
_PROTOCOL_TAGS = tuple(f"<{k}>" for k in ("think", *sorted(ACTION_KINDS))) + tuple(
    f"</{k}>" for k in ("think", *sorted(ACTION_KINDS))
)
_MAX_NUMBER_CHARS = 64  # no sane pixel coordinate is longer; keeps float() off megabyte strings
_MAX_REASON_CHARS = 160


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    think: str | None  # stripped text of the first <think>…</think>, None if there is none
    content: str  # search query / answer text / raw bbox text, stripped; "" when invalid
    bbox: tuple[float, float, float, float] | None = None  # only for kind == "bbox"
    reason: str | None = None  # only for kind == "invalid": short, human-readable


def parse_action(text: str, allowed: frozenset[str] = ACTION_KINDS) -> Action:
    """The action taken by assistant turn ``text``; kind "invalid" (with a reason) if there is none."""
    if not allowed <= ACTION_KINDS:
        raise ValueError(f"allowed kinds must be among {sorted(ACTION_KINDS)}, got {sorted(allowed)}")
    text = _strip_end_of_turn(text)
    think = _first_think(text)
    found = _first_action_tag(text)
    if found is None:
        return _invalid(think, "no complete <search>, <bbox> or <answer> tag")
    kind, content = found
    if kind not in allowed:
        return _invalid(think, f"<{kind}> is not allowed now; allowed: {', '.join(sorted(allowed))}")
    if any(tag in content for tag in _PROTOCOL_TAGS):
        return _invalid(think, f"<{kind}> contains another tag")
    content = content.strip()
    if kind == ActionKind.BBOX:
        box = _parse_bbox(content)
        if isinstance(box, str):
            return _invalid(think, box)
        return Action(kind, think, content, bbox=box)
    if not content:
        return _invalid(think, f"empty <{kind}>")
    return Action(kind, think, content)


def _strip_end_of_turn(text: str) -> str:
    # Move an end index instead of slicing per token: a text of many tokens stays linear.
    end = len(text.rstrip())
    while True:
        token = next((t for t in END_OF_TURN_TOKENS if text.endswith(t, 0, end)), None)
        if token is None:
            return text[:end]
        end -= len(token)
        while end > 0 and text[end - 1].isspace():
            end -= 1


def _first_think(text: str) -> str | None:
    start = text.find("<think>")
    if start < 0:
        return None
    end = text.find("</think>", start + len("<think>"))
    return None if end < 0 else text[start + len("<think>") : end].strip()


def _first_action_tag(text: str) -> tuple[ActionKind, str] | None:
    """(kind, raw content) of the first complete action tag outside think blocks."""
    # Closing-tag positions are cached per tag: each find runs past a position at most once, so a
    # text of many unclosed openers (e.g. "<search>" * 100000) stays linear.
    next_close: dict[str, int] = {}
    pos = 0
    while True:
        match = _OPENING.search(text, pos)
        if match is None:
            return None
        kind, body = match.group(1), match.end()
        close_tag = f"</{kind}>"
        close = next_close.get(close_tag)
        if close is None or (0 <= close < body):
            close = text.find(close_tag, body)
            next_close[close_tag] = close
        if close < 0:
            pos = body  # unclosed: skip the opener
        elif kind == "think":
            pos = close + len(close_tag)
        else:
            return ActionKind(kind), text[body:close]


def _parse_bbox(content: str) -> tuple[float, float, float, float] | str:
    if not (content.startswith("[") and content.endswith("]")):
        return "bbox must be written as [x1, y1, x2, y2]"
    parts = content[1:-1].split(",")
    if len(parts) != 4:
        return f"bbox needs 4 numbers, got {len(parts)} comma-separated items"
    values = []
    for part in parts:
        part = part.strip()
        # float() alone would also take "1_000" and non-ASCII digits such as "١٢".
        if not part or len(part) > _MAX_NUMBER_CHARS or not part.isascii() or "_" in part:
            return "bbox coordinates must be plain numbers"
        try:
            value = float(part)
        except ValueError:
            return "bbox coordinates must be plain numbers"
        if not math.isfinite(value):
            return "bbox coordinates must be finite"
        values.append(value)
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        return "bbox needs x2 > x1 and y2 > y1"
    return x1, y1, x2, y2


def _invalid(think: str | None, reason: str) -> Action:
    return Action(ActionKind.INVALID, think, "", reason=reason[:_MAX_REASON_CHARS])
