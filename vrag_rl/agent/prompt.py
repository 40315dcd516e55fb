"""The instruction prompt and the fixed feedback turns of the agent protocol.

Placement ``"user"`` puts instructions and question in one user turn (``template``); placement
``"system"`` makes the instructions the system prompt (``system_template``) and the question the user
turn (``user_template``). The question replaces every literal ``{question}``; no other brace is
interpreted, so templates and questions may contain ``{`` and ``}`` freely.
"""

from dataclasses import dataclass

QUESTION_PLACEHOLDER = "{question}"
PLACEMENTS = ("user", "system")

INSTRUCTIONS = (
    "Answer the given question using images of document pages.\n"
    "You must reason inside <think> and </think> first every time you get new information.\n"
    "If you lack some knowledge after reasoning, you can call a search engine with "
    "<search> query </search>; it returns the most relevant page image.\n"
    "To look closer at a region of the most recent image you were shown, crop it with "
    "<bbox>[x1, y1, x2, y2]</bbox>, giving absolute pixel coordinates in that image as it was shown "
    "to you; the region is returned enlarged.\n"
    "You may search and crop as many times as you want. Take exactly one action per turn.\n"
    "Once you have enough information, give the answer inside <answer> and </answer>, without "
    "detailed explanations. For example, <answer> Beijing </answer>."
)
DEFAULT_TEMPLATE = INSTRUCTIONS + "\nQuestion: " + QUESTION_PLACEHOLDER

INVALID_ACTION_FEEDBACK = (
    "Your previous action is invalid. Reason inside <think> </think>, then take exactly one action: "
    "<search> query </search> to search, <bbox>[x1, y1, x2, y2]</bbox> to crop the most recent image, "
    "or <answer> answer </answer> to answer. Please try again."
)
ANSWER_NOW_FEEDBACK = "You have reached the search limit. Answer now with <answer> ... </answer>."
# The single-turn baselines (evaluation's vanilla RAG and direct answering): pages, if any, come with the question.
REFERENCE_INSTRUCTIONS = (
    "Answer the given question using images of document pages given as reference, if any.\n"
    "You must reason inside <think> and </think> first, then give the answer inside <answer> and </answer>, "
    "without detailed explanations. For example, <answer> Beijing </answer>."
)


@dataclass
class PromptConfig:
    template: str = DEFAULT_TEMPLATE  # placement "user": instructions and question in one turn
    placement: str = "user"
    system_template: str = INSTRUCTIONS  # placement "system": the system prompt
    user_template: str = QUESTION_PLACEHOLDER  # placement "system": the user turn
    reference_instructions: str = REFERENCE_INSTRUCTIONS  # single-turn tasks (``build_reference_messages``)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"prompt placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.placement == "user" and QUESTION_PLACEHOLDER not in self.template:
            raise ValueError(f"prompt template must contain {QUESTION_PLACEHOLDER} (placement 'user')")
        if self.placement == "system":
            if QUESTION_PLACEHOLDER not in self.user_template:
                raise ValueError(f"prompt user_template must contain {QUESTION_PLACEHOLDER} (placement 'system')")
            if QUESTION_PLACEHOLDER in self.system_template:
                raise ValueError(
                    f"prompt system_template must not contain {QUESTION_PLACEHOLDER}: "
                    "with placement 'system' the question goes in user_template"
                )


def _text_turn(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def build_messages(question: str, cfg: PromptConfig) -> list[dict]:
    """The opening chat messages (Hugging Face chat format) for ``question``."""
    if cfg.placement == "system":
        return [
            _text_turn("system", cfg.system_template),
            _text_turn("user", cfg.user_template.replace(QUESTION_PLACEHOLDER, question)),
        ]
    return [_text_turn("user", cfg.template.replace(QUESTION_PLACEHOLDER, question))]


def build_reference_messages(question: str, num_pages: int, cfg: PromptConfig) -> list[dict]:
    """The one user turn of a single-turn task: instructions, ``num_pages`` image parts under a "Reference"
    heading (none: no heading), then the question."""
    content = [{"type": "text", "text": cfg.reference_instructions}]
    if num_pages:
        content += [{"type": "text", "text": "\nReference:\n"}] + [{"type": "image"}] * num_pages
    content.append({"type": "text", "text": "\nQuestion: " + question})
    return [{"role": "user", "content": content}]
