"""parse_action: hand-written adversarial cases plus property-based fuzzing."""

import contextlib
import math
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vrag_rl.agent.actions import ACTION_KINDS, Action, parse_action

KINDS = {"search", "bbox", "answer", "invalid"}
TAGS = ["<think>", "</think>", "<search>", "</search>", "<bbox>", "</bbox>", "<answer>", "</answer>"]
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def hang_guard(seconds: int = 10):
    """Fail (instead of hanging the suite) if the body runs longer than ``seconds``."""

    def _raise(signum, frame):
        raise TimeoutError(f"parse_action did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_invariants(text: str, action: Action) -> None:
    assert isinstance(action, Action)
    assert action.kind in KINDS
    if action.kind == "invalid":
        assert action.content == "" and action.bbox is None
        assert action.reason and len(action.reason) <= 160
    else:
        assert f"<{action.kind}>" in text and f"</{action.kind}>" in text
        assert action.content and action.content == action.content.strip()
        assert action.content in text
        assert action.reason is None
        assert (action.bbox is not None) == (action.kind == "bbox")
    if action.bbox is not None:
        x1, y1, x2, y2 = action.bbox
        assert all(math.isfinite(v) for v in action.bbox) and x2 > x1 and y2 > y1


# ---- hand-written cases ---------------------------------------------------------------------------


def test_typical_turns():
    a = parse_action("<think>I need the revenue.</think>\n<search> 2019 revenue by region </search><|im_end|>")
    assert a == Action("search", "I need the revenue.", "2019 revenue by region")
    a = parse_action("<think>zoom</think><bbox>[10, 20.5, 300, 4e2]</bbox>")
    assert a == Action("bbox", "zoom", "[10, 20.5, 300, 4e2]", bbox=(10.0, 20.5, 300.0, 400.0))
    a = parse_action("<answer> Beijing </answer><|endoftext|>  ")
    assert a == Action("answer", None, "Beijing")


@pytest.mark.parametrize(
    "text,kind,content",
    [
        ("<search>a</search><answer>b</answer>", "search", "a"),  # first wins
        ("<answer>b</answer><search>a</search>", "answer", "b"),
        ("<bbox>[0,0,1,1]</bbox><search>a</search>", "bbox", "[0,0,1,1]"),
        ("<search> unclosed <answer>b</answer>", "answer", "b"),  # unclosed opener is skipped
        ("<think>maybe <search>x</search>?</think><answer>y</answer>", "answer", "y"),  # think hides tags
        ("<think>unclosed <search>x</search>", "search", "x"),  # an unclosed think hides nothing
        ("text<answer>\n multi\nline \n</answer>trailing", "answer", "multi\nline"),
        ("<answer>x</answer><|im_end|><|endoftext|><|im_end|>", "answer", "x"),
        ("<search>שלום عالم 🙂\u200b</search>", "search", "שלום عالم 🙂\u200b"),
        ("<answer>a<|im_end|>b</answer>", "answer", "a<|im_end|>b"),
    ],
)
def test_which_action_wins(text, kind, content):
    a = parse_action(text)
    assert (a.kind, a.content) == (kind, content)
    check_invariants(text, a)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("", "no complete"),
        ("just text", "no complete"),
        ("<search>never closed", "no complete"),
        ("</search>q<search>", "no complete"),
        ("<SEARCH>q</SEARCH>", "no complete"),  # case-sensitive
        ("<search >q</search >", "no complete"),
        ("<think><answer>x</answer></think>", "no complete"),
        ("<search><answer>x</answer></search>", "another tag"),  # nested
        ("<search>a <search>b</search>", "another tag"),
        ("<answer>a </bbox> b</answer>", "another tag"),
        ("<answer>a <think>t</think> b</answer>", "another tag"),
        ("<search>   </search>", "empty"),
        ("<answer></answer>", "empty"),
        ("<bbox>[1, 2, 3]</bbox>", "4 numbers"),
        ("<bbox>[1, 2, 3, 4, 5]</bbox>", "4 numbers"),
        ("<bbox>1, 2, 3, 4</bbox>", "[x1, y1, x2, y2]"),
        ("<bbox>[1 2 3 4]</bbox>", "4 numbers"),
        ("<bbox>[]</bbox>", "4 numbers"),
        ("<bbox></bbox>", "[x1, y1, x2, y2]"),
        ("<bbox>[nan, 0, 1, 1]</bbox>", "finite"),
        ("<bbox>[0, 0, inf, 1]</bbox>", "finite"),
        ("<bbox>[0, 0, 1e309, 1]</bbox>", "finite"),
        ("<bbox>[-Infinity, 0, 1, 1]</bbox>", "finite"),
        ("<bbox>[a, 0, 1, 1]</bbox>", "plain numbers"),
        ("<bbox>[1_0, 0, 20, 1]</bbox>", "plain numbers"),
        ("<bbox>[١, 0, 20, 1]</bbox>", "plain numbers"),  # Arabic-Indic digit: float() would take it
        ("<bbox>[, 0, 20, 1]</bbox>", "plain numbers"),
        ("<bbox>[0x1, 0, 20, 1]</bbox>", "plain numbers"),
        ("<bbox>[" + "1" * 100 + ", 0, 20, 1]</bbox>", "plain numbers"),
        ("<bbox>[5, 0, 5, 1]</bbox>", "x2 > x1"),  # zero area
        ("<bbox>[0, 9, 5, 1]</bbox>", "x2 > x1"),
    ],
)
def test_invalid_turns(text, fragment):
    a = parse_action(text)
    assert a.kind == "invalid" and fragment in a.reason, a
    check_invariants(text, a)


def test_negative_and_huge_finite_coordinates_pass_to_the_geometry():
    a = parse_action("<bbox>[ -50 ,-1e5,\t1e300 , 99999999 ]</bbox>")
    assert a.kind == "bbox" and a.bbox == (-50.0, -1e5, 1e300, 99999999.0)


def test_allowed_kinds():
    final_turn = frozenset({"answer"})
    a = parse_action("<search>q</search>", final_turn)
    assert a.kind == "invalid" and "not allowed" in a.reason
    # First tag decides: a later answer does not rescue a disallowed search.
    assert parse_action("<search>q</search><answer>a</answer>", final_turn).kind == "invalid"
    assert parse_action("<answer>a</answer>", final_turn).content == "a"
    with pytest.raises(ValueError):
        parse_action("<answer>a</answer>", frozenset({"crop"}))


def test_think_is_the_first_complete_block():
    assert parse_action("<think> a </think><think>b</think><answer>x</answer>").think == "a"
    assert parse_action("<answer>x</answer><think>late</think>").think == "late"
    assert parse_action("<think>unclosed <answer>x</answer>").think is None
    assert parse_action("<think></think>").think == ""


@pytest.mark.parametrize(
    "text",
    [
        "<search>" * 100_000,
        "<think>" * 100_000,
        "<think>" * 100_000 + "</think>",
        "<search>" * 100_000 + "</search>",
        "<search>x</search>".replace("</search>", "") * 100_000 + "<answer>y</answer>",
        "<bbox>[" + "1," * 500_000 + "]</bbox>",
        "<bbox>[" + "9" * 2_000_000 + ", 0, 1, 1]</bbox>",
        "<" * 3_000_000,
        "<answer>" + "a" * 5_000_000 + "</answer>",
        "<search>" + "<think>" * 200_000 + "</search>",
        "</think>" * 200_000 + "<think>",
        "<|im_end|>" * 300_000,
        "\u200f\U0001f600" * 500_000,
    ],
    ids=lambda t: repr(t[:24]) + f"..[{len(t)}]",
)
def test_megabyte_inputs_do_not_hang(text):
    with hang_guard():
        a = parse_action(text)
    check_invariants(text, a)


def test_outcomes_of_large_inputs():
    with hang_guard():
        assert parse_action("<search>" * 100_000 + "</search>").reason == "<search> contains another tag"
        assert parse_action("<search>" * 100_000 + "<answer>y</answer>").content == "y"
        assert parse_action("<answer>" + "a" * 5_000_000 + "</answer>").content == "a" * 5_000_000


# ---- property-based fuzzing -----------------------------------------------------------------------

# Text that cannot form a tag on its own: no '<' at all.
plain = st.text(st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), max_size=60)
# Tag soup: fragments of tags, numbers, brackets and unicode glued together.
fragments = st.sampled_from(
    TAGS
    + [
        "<",
        ">",
        "/",
        "[",
        "]",
        ",",
        " ",
        "\n",
        "1",
        "-3.5",
        "1e309",
        "nan",
        "\u202e",
        "\u200b",
        "🙂",
        "<|im_end|>",
        "<|endoftext|>",
        "<bbox>[1, 2, 3, 4]</bbox>",
        "<search>q</search>",
    ]
)
soup = st.lists(st.one_of(fragments, plain), max_size=40).map("".join)


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text(text):
    check_invariants(text, parse_action(text))


@FUZZ
@given(soup, st.sets(st.sampled_from(sorted(ACTION_KINDS)), min_size=1).map(frozenset))
def test_fuzz_tag_soup(text, allowed):
    a = parse_action(text, allowed)
    check_invariants(text, a)
    assert a.kind == "invalid" or a.kind in allowed


def _no_tags(s: str) -> bool:
    return not any(tag in s for tag in TAGS)


# Thoughts may mention tags: inside a complete think block they are not actions.
think_text = st.one_of(st.none(), plain, st.one_of(st.text(max_size=80), soup).filter(lambda s: "</think>" not in s))
content_text = st.text(min_size=1, max_size=80).filter(lambda s: _no_tags(s) and s.strip() != "")
finite = st.floats(allow_nan=False, allow_infinity=False, max_value=1e300)
end_token = st.sampled_from(["", "<|im_end|>", "<|endoftext|>", "\n<|im_end|>\n"])


@st.composite
def well_formed_turn(draw):
    think = draw(think_text)
    kind = draw(st.sampled_from(sorted(ACTION_KINDS)))
    if kind == "bbox":
        x1, y1 = draw(finite), draw(finite)
        x2 = draw(st.floats(min_value=x1, exclude_min=True, allow_nan=False, allow_infinity=False))
        y2 = draw(st.floats(min_value=y1, exclude_min=True, allow_nan=False, allow_infinity=False))
        as_int = draw(st.booleans()) and all(abs(v) < 2**53 and v == int(v) for v in (x1, y1, x2, y2))
        fmt = (lambda v: str(int(v))) if as_int else repr
        spaces = draw(st.sampled_from(["", " ", "  ", "\t", "\n"]))
        body = "[" + ",".join(spaces + fmt(v) + spaces for v in (x1, y1, x2, y2)) + "]"
        content, box = body, (x1, y1, x2, y2)
    else:
        content, box = draw(content_text), None
    pad = draw(st.sampled_from(["", " ", "\n", "  \n\t"]))
    prefix = "" if think is None else f"<think>{think}</think>" + draw(st.sampled_from(["", "\n", " "]))
    tail = draw(plain)  # text after the action (it is ignored)
    text = f"{prefix}<{kind}>{pad}{content}{pad}</{kind}>{tail}{draw(end_token)}"
    expected_think = None if think is None else think.strip()
    return text, Action(kind, expected_think, content.strip(), bbox=box)


@FUZZ
@given(well_formed_turn())
def test_fuzz_well_formed_turns_parse_exactly(case):
    text, expected = case
    assert parse_action(text) == expected
