"""Expert (and deliberately flawed) trajectories for corpus questions with a known answer box.

The expert searches with the question, crops the printed answer out of the page it was shown and
answers: think → search → page → think → bbox → crop → think → answer. Every assistant text goes through
the real protocol (action parser, crop geometry in the frame of the image as shown, chat encoder), so these
trajectories are exactly what a policy following the protocol would produce, token for token. Flawed
variants of the same script give a group of trajectories with different rewards.

Search here is an oracle that returns the gold page: these trajectories are demonstrations (supervised warm
start, reward checks), not rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vrag_rl.agent.actions import Action, ActionKind, parse_action
from vrag_rl.agent.chat import ChatEncoder
from vrag_rl.agent.images import ImageBudget, View, crop_view, fit_to_budget, page_view
from vrag_rl.agent.prompt import INVALID_ACTION_FEEDBACK, PromptConfig, build_messages
from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.data.records import QARecord

VARIANTS = ("expert", "no_crop", "wrong_answer", "invalid_first", "no_search")


@dataclass
class ScriptedTrajectory:
    """A trajectory plus what the reward needs to know about it."""

    qid: str
    variant: str
    trajectory: Trajectory
    texts: list[str] = field(default_factory=list)  # assistant texts, in order
    actions: list[Action] = field(default_factory=list)
    retrieved_pages: list[str] = field(default_factory=list)
    crops: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)  # (page, raw box)
    answer: str | None = None


def _script(record: QARecord, variant: str, view: View, wrong_answer: str) -> list[str]:
    """Assistant texts of one variant; the bbox is the answer box mapped into the shown page's frame."""
    _, x0, y0, x1, y1 = record.answer_box
    rx0, ry0, rx1, ry1 = view.region
    sx, sy = view.shown_size[0] / (rx1 - rx0), view.shown_size[1] / (ry1 - ry0)
    margin = 6  # shown pixels of context around the printed answer
    box = [
        max(0, round(x0 * sx) - margin),
        max(0, round(y0 * sy) - margin),
        min(view.shown_size[0], round(x1 * sx) + margin),
        min(view.shown_size[1], round(y1 * sy) + margin),
    ]
    # The question itself is the query: its content words tell the entity's pages apart (the entity alone
    # is printed on every page of its report), and copying it is the easiest search a small policy can learn.
    search = f"<think>I need the page that answers this question.</think>\n<search>{record.question}</search>"
    crop = (
        "<think>The answer is printed in a small region of this page; zoom in.</think>\n"
        f"<bbox>[{box[0]}, {box[1]}, {box[2]}, {box[3]}]</bbox>"
    )
    answer = record.answer if variant != "wrong_answer" else wrong_answer
    final = f"<think>The page shows the answer.</think>\n<answer>{answer}</answer>"
    if variant == "expert" or variant == "wrong_answer":
        return [search, crop, final]
    if variant == "no_crop":
        return [search, final]
    if variant == "invalid_first":
        return [f"<think>Let me look.</think>\n<serch>{record.entity}</serch>", search, crop, final]
    if variant == "no_search":
        return [final]
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def scripted_trajectory(
    record: QARecord,
    page_image: Image.Image,
    encoder: ChatEncoder,
    variant: str = "expert",
    *,
    prompt: PromptConfig = PromptConfig(),
    budget: ImageBudget = ImageBudget(),
    wrong_answer: str = "unknown",
    max_length: int | None = None,
) -> ScriptedTrajectory:
    if record.answer_box is None or record.answer_box[0] not in record.gold_pages:
        raise ValueError(f"question {record.qid} has no answer box on a gold page")
    gold = record.answer_box[0]
    tok = encoder.tokenizer
    traj = Trajectory(max_length=max_length)
    out = ScriptedTrajectory(record.qid, variant, traj)
    traj.add_prompt(encoder.prompt(build_messages(record.question, prompt))[0])
    shown_view = page_view(gold, page_image.size, budget)
    view: View | None = None  # the most recent image shown, which a bbox refers to
    for text in _script(record, variant, shown_view, wrong_answer):
        action = parse_action(text)
        out.texts.append(text)
        out.actions.append(action)
        if not traj.add_model_turn(tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]):
            break
        images, feedback = [], None
        if action.kind == ActionKind.SEARCH:
            view = shown_view
            out.retrieved_pages.append(gold)
            images = [fit_to_budget(page_image, budget.min_pixels, budget.max_pixels, budget.factor)]
        elif action.kind == ActionKind.BBOX:
            result = crop_view(view, action.bbox, page_image, budget) if view else "crop before any image"
            if isinstance(result, str):
                feedback = INVALID_ACTION_FEEDBACK
            else:
                view, shown = result
                out.crops.append((gold, tuple(int(v) for v in view.region)))
                images = [shown]
        elif action.kind == ActionKind.ANSWER:
            out.answer = action.content
            break
        else:
            feedback = INVALID_ACTION_FEEDBACK
        ids, enc = encoder.observation(images, feedback)
        if not traj.add_observation(ids, enc.images, enc.pixel_values, enc.grids):
            break
    return out


def load_page(corpus_dir: str | Path, page_id: str) -> Image.Image:
    with Image.open(Path(corpus_dir) / "pages" / f"{page_id}.jpg") as im:
        return im.convert("RGB")
