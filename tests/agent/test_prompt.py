"""Prompt templates, placements and the fixed feedback turns."""

import pytest

from vrag_rl.agent.prompt import (
    ANSWER_NOW_FEEDBACK,
    DEFAULT_TEMPLATE,
    INSTRUCTIONS,
    INVALID_ACTION_FEEDBACK,
    PromptConfig,
    build_messages,
)


def _texts(messages):
    return [(m["role"], [c["type"] for c in m["content"]], m["content"][0]["text"]) for m in messages]


def test_user_placement_is_one_user_turn():
    messages = build_messages("What is the 2019 revenue?", PromptConfig())
    [(role, types, text)] = _texts(messages)
    assert role == "user" and types == ["text"]
    assert text == DEFAULT_TEMPLATE.replace("{question}", "What is the 2019 revenue?")
    assert text.endswith("Question: What is the 2019 revenue?")


def test_system_placement_splits_instructions_and_question():
    messages = build_messages("Q?", PromptConfig(placement="system"))
    assert _texts(messages) == [("system", ["text"], INSTRUCTIONS), ("user", ["text"], "Q?")]


def test_default_instructions_name_every_tag():
    tags = ["<think>", "</think>", "<search>", "</search>", "<bbox>[x1, y1, x2, y2]</bbox>", "<answer>", "</answer>"]
    for tag in tags:
        assert tag in INSTRUCTIONS
    assert "{question}" not in INSTRUCTIONS and "{question}" in DEFAULT_TEMPLATE


def test_braces_are_literal_except_the_placeholder():
    cfg = PromptConfig(template='Reply as JSON {"a": 1}. Q: {question} / again: {question}')
    [(_, _, text)] = _texts(build_messages("what is {x}? {question}", cfg))
    assert text == 'Reply as JSON {"a": 1}. Q: what is {x}? {question} / again: what is {x}? {question}'


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"placement": "assistant"}, "placement"),
        ({"template": "no placeholder"}, "{question}"),
        ({"placement": "system", "user_template": "no placeholder"}, "user_template"),
        ({"placement": "system", "system_template": "Q: {question}"}, "system_template"),
    ],
)
def test_invalid_configs(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        PromptConfig(**kwargs)


def test_unused_fields_are_not_validated():
    # A system-placement config does not use `template`, a user-placement one not the split pair.
    PromptConfig(placement="system", template="unused")
    PromptConfig(user_template="unused")


def test_feedback_turns():
    assert INVALID_ACTION_FEEDBACK.startswith("Your previous action is invalid.")
    for form in ("<search> query </search>", "<bbox>[x1, y1, x2, y2]</bbox>", "<answer> answer </answer>"):
        assert form in INVALID_ACTION_FEEDBACK
    assert "<answer> ... </answer>" in ANSWER_NOW_FEEDBACK and "<search>" not in ANSWER_NOW_FEEDBACK
