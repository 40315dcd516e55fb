"""Supervised warm start on expert trajectories: the data and the loop, for any trainer (Ray ranks or local).

A random policy never emits a parseable action, so RL from scratch would only see invalid turns and zero
rewards. Behaviour cloning on the corpus's expert script (think → search → page → think → bbox → crop →
think → answer; ``data.expert``) teaches the protocol. The loss is the masked NLL of the assistant tokens of
whole multi-turn trajectories, images included, through the same forward as GRPO.

Lone crop turns (``crop_batch_size`` per step) fix a failure of pure behaviour cloning on small models. In a
whole trajectory the question already tells a memorising policy every coordinate, so it never learns that y2
follows y1, and on a new question it mixes coordinates of different boxes ([112, 211, 206, 106]). A lone crop
turn is an expert crop turn after a bare assistant header, its x pair from one expert box and its y pair from
another, so nothing but x1 predicts x2 and nothing but y1 predicts y2.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tqdm import tqdm

from vrag_rl.agent.actions import Action, ActionKind
from vrag_rl.agent.chat import ChatEncoder
from vrag_rl.agent.images import ImageBudget
from vrag_rl.agent.prompt import PromptConfig
from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.data.expert import load_page, scripted_trajectory
from vrag_rl.data.records import QARecord
from vrag_rl.retrieval.base import PageCatalog
from vrag_rl.rollout.agent_loop import AgentConfig
from vrag_rl.rollout.replay import Recording, replay
from vrag_rl.trainer.actor import SkipGuard, Trainer
from vrag_rl.trainer.sampler import EpochSampler


def lone_crop(x_from: Action, y_from: Action, text: str, encoder: ChatEncoder) -> Trajectory:
    """The crop turn ``text`` (whose action is ``x_from``) alone, its box x_from's x pair and y_from's y pair."""
    x1, _, x2, _ = (int(v) for v in x_from.bbox)
    _, y1, _, y2 = (int(v) for v in y_from.bbox)
    lone = Trajectory()
    lone.add_prompt(encoder.assistant_header_ids)
    lone.add_model_turn(
        encoder.tokenizer(
            text.replace(x_from.content, f"[{x1}, {y1}, {x2}, {y2}]") + "<|im_end|>", add_special_tokens=False
        )["input_ids"]
    )
    return lone


class ExpertData:
    """Expert trajectories of the questions that have an answer box (``expert``) and teacher trajectories
    replayed through the agent loop (``teacher``: ``vrag_rl.eval sft-data``), and their crop turns."""

    def __init__(
        self,
        records: list[QARecord],
        corpus: str | Path,
        encoder: ChatEncoder,
        *,
        prompt: PromptConfig = PromptConfig(),
        budget: ImageBudget = ImageBudget(),
        max_length: int | None = None,
        progress: bool = True,
        expert: bool = True,
        teacher: list[Recording] = (),
        agent: AgentConfig | None = None,
    ):
        usable = [r for r in records if r.answer_box is not None] if expert else []
        if expert and not usable:
            raise ValueError(f"no question of {corpus} has an answer box: nothing to build expert trajectories from")
        self.encoder = encoder
        self.trajectories: list[Trajectory] = []
        self.crops: list[tuple[Action, str]] = []  # (crop action, its assistant text)
        if teacher:
            agent = agent or AgentConfig(prompt=prompt, budget=budget, max_length=max_length or 8192)
            self._add_teacher(teacher, PageCatalog(corpus), agent, progress)
        for r in tqdm(usable, desc="expert trajectories", unit="question", disable=not progress):
            expert = scripted_trajectory(
                r,
                load_page(corpus, r.answer_box[0]),
                encoder,
                "expert",
                prompt=prompt,
                budget=budget,
                max_length=max_length,
            )
            self.trajectories.append(expert.trajectory)
            self.crops += [(a, t) for a, t in zip(expert.actions, expert.texts) if a.kind == ActionKind.BBOX]

    def _add_teacher(self, teacher: list[Recording], catalog: PageCatalog, agent: AgentConfig, progress: bool) -> None:
        for recording in tqdm(teacher, desc="teacher trajectories", unit="trajectory", disable=not progress):
            rollout = replay(recording, catalog, self.encoder, agent)
            self.trajectories.append(rollout.trajectory)
            self.crops += [
                (a, t) for a, t in zip(rollout.actions, rollout.texts) if a.kind == ActionKind.BBOX and a.bbox
            ]

    def batches(self, batch_size: int, crop_batch_size: int, seed: int):
        """Forever: ``batch_size`` expert trajectories (each once per epoch) plus ``crop_batch_size`` lone crops."""
        if crop_batch_size and not self.crops:
            raise ValueError("sft.crop_batch_size > 0 but no trajectory has a crop turn to make lone crops from")
        experts, rng = EpochSampler(len(self.trajectories), seed), random.Random(seed)
        while True:
            pairs = [(rng.choice(self.crops), rng.choice(self.crops)) for _ in range(crop_batch_size)]
            yield [self.trajectories[i] for i in experts.take(batch_size)] + [
                lone_crop(xa, ya, text, self.encoder) for (xa, text), (ya, _) in pairs
            ]


def run_sft(
    trainer: Trainer,
    data: ExpertData,
    steps: int,
    batch_size: int,
    crop_batch_size: int,
    seed: int,
    metrics_file: Path | None = None,
    guard: SkipGuard | None = None,
) -> list[dict]:
    """``steps`` optimizer steps of ``trainer.sft_update`` (token-mean NLL over each whole batch); returns and
    (optionally) writes one metrics row per step. ``guard`` stops the loop when updates keep being skipped."""
    rows = []
    batches = data.batches(batch_size, crop_batch_size, seed)
    sink = open(metrics_file, "w") if metrics_file else None
    try:
        bar = tqdm(range(1, steps + 1), desc="sft", unit="step")
        for step in bar:
            metrics = trainer.sft_update(next(batches))
            if guard is not None:
                guard.record(metrics["skipped_updates"] > 0, f"SFT step {step}")
            rows.append({"step": step, **metrics, "lr": trainer.end_step()})
            if sink:
                sink.write(json.dumps(rows[-1]) + "\n")
                sink.flush()
            bar.set_postfix(nll=f"{metrics['nll']:.3f}")
    finally:
        if sink:
            sink.close()
    return rows
