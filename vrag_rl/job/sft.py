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
import logging
import random
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from vrag_rl.agent.actions import Action, ActionKind
from vrag_rl.agent.chat import ChatEncoder
from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.data.expert import load_page, scripted_trajectory
from vrag_rl.data.records import QARecord
from vrag_rl.job.checkpoint import FINGERPRINT, check_fingerprint
from vrag_rl.job.config import TrainConfig
from vrag_rl.job.guard import SkipGuard
from vrag_rl.job.sampler import EpochSampler
from vrag_rl.learner.config import OptimConfig
from vrag_rl.learner.payloads import Objective
from vrag_rl.learner.trainer import Trainer
from vrag_rl.progress import progress_bar
from vrag_rl.retrieval.base import PageCatalog
from vrag_rl.rollout.agent_loop import AgentConfig
from vrag_rl.rollout.replay import Recording, replay

log = logging.getLogger("vrag_rl.sft")


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
    replayed through the agent loop (``teacher``: ``vrag_rl.eval sft-data``), and their crop turns, built as
    the agent configured by ``agent`` (prompt, image budget, length limit) would see them."""

    def __init__(
        self,
        records: list[QARecord],
        corpus: str | Path,
        encoder: ChatEncoder,
        agent: AgentConfig,
        *,
        expert: bool = True,
        teacher: list[Recording] = (),
        progress: bool = True,
    ):
        usable = [r for r in records if r.answer_box is not None] if expert else []
        if expert and not usable:
            raise ValueError(f"no question of {corpus} has an answer box: nothing to build expert trajectories from")
        self.encoder = encoder
        self.trajectories: list[Trajectory] = []
        self.crops: list[tuple[Action, str]] = []  # (crop action, its assistant text)
        if teacher:
            self._add_teacher(teacher, PageCatalog(corpus), agent, progress)
        for r in progress_bar(usable, desc="expert trajectories", unit="question", disable=not progress):
            expert = scripted_trajectory(
                r,
                load_page(corpus, r.answer_box[0]),
                encoder,
                "expert",
                prompt=agent.prompt,
                budget=agent.budget,
                max_length=agent.max_length,
            )
            self.trajectories.append(expert.trajectory)
            self.crops += [(a, t) for a, t in zip(expert.actions, expert.texts) if a.kind == ActionKind.BBOX]

    def _add_teacher(self, teacher: list[Recording], catalog: PageCatalog, agent: AgentConfig, progress: bool) -> None:
        for recording in progress_bar(teacher, desc="teacher trajectories", unit="trajectory", disable=not progress):
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
    batches: Iterator[list[Trajectory]],
    steps: int,
    *,
    metrics_file: Path | None = None,
    guard: SkipGuard | None = None,
) -> list[dict]:
    """``steps`` optimizer steps of ``trainer.sft_update``, one batch each (``ExpertData.batches``; token-mean
    NLL over each whole batch); returns and (optionally) writes one metrics row per step. ``guard`` stops the
    loop when updates keep being skipped."""
    rows = []
    sink = open(metrics_file, "w") if metrics_file else None
    try:
        bar = progress_bar(range(1, steps + 1), desc="sft", unit="step")
        for step in bar:
            metrics = trainer.sft_update(next(batches))
            if guard is not None:
                guard.record(metrics["skipped_updates"] > 0, f"SFT step {step}")
            rows.append({"step": step, **metrics, "lr": trainer.end_step()})
            if sink:
                sink.write(json.dumps(rows[-1]) + "\n")
                sink.flush()
            bar.set_postfix(nll=f"{metrics['nll']:.3f}")
            if step % max(1, steps // 10) == 0 or step == steps:  # ten lines of the story, however long
                log.info("sft step %d/%d: nll %.3f, lr %.2e", step, steps, metrics["nll"], rows[-1]["lr"])
    finally:
        if sink:
            sink.close()
    return rows


SFT_KEYS = ("seed", "models.", "data", "sft.", "trainer.", "rollout.agent.")  # the warm start's settings


def warm_start(
    cfg: TrainConfig, policy_dir: str, corpus: Path, train_qa: list[QARecord], out: Path, run_print: dict
) -> str:
    """The main job's supervised warm start (``sft.steps`` > 0) into ``OUT/sft``, or the policy as it is; returns
    the directory GRPO starts from. ``OUT/sft`` is reused when its fingerprint (written last, so it marks the
    warm start complete) matches the run's ``SFT_KEYS`` settings."""
    if not cfg.sft.steps:
        return policy_dir
    sft_dir, sft_print = out / "sft", {k: v for k, v in run_print.items() if k.startswith(SFT_KEYS)}
    if (sft_dir / FINGERPRINT).is_file():
        check_fingerprint(sft_dir, sft_print, "the supervised warm start")
        return str(sft_dir)
    shutil.rmtree(sft_dir, ignore_errors=True)
    log.info("supervised warm start: %d steps on the training questions' expert trajectories", cfg.sft.steps)
    sft_on_ranks(cfg, policy_dir, corpus, train_qa, sft_dir, out / "sft_metrics.jsonl")
    (sft_dir / FINGERPRINT).write_text(json.dumps(sft_print, indent=1, sort_keys=True))
    return str(sft_dir)


def sft_on_ranks(
    cfg: TrainConfig, policy_dir: str, corpus: Path, train_qa: list[QARecord], out_dir: Path, metrics_file: Path
) -> None:
    """Supervised steps on expert trajectories of the training questions and on teacher trajectories
    (``sft.expert``, ``sft.teacher_data``) on trainer ranks of their own, with a cosine schedule; exported to
    ``out_dir``. The ranks are stopped however the steps end."""
    from transformers import AutoProcessor

    from vrag_rl.evaluation.teacher import load_recordings
    from vrag_rl.learner.ranks import TrainerGroup

    data = ExpertData(
        train_qa,
        corpus,
        ChatEncoder(AutoProcessor.from_pretrained(policy_dir)),
        cfg.rollout.agent,
        expert=cfg.sft.expert,
        teacher=load_recordings(Path(cfg.sft.teacher_data)) if cfg.sft.teacher_data else [],
    )
    optim = OptimConfig(
        lr=cfg.sft.lr, warmup_steps=cfg.sft.warmup_steps, schedule="cosine", grad_clip=cfg.trainer.optim.grad_clip
    )
    trainer_cfg = replace(cfg.trainer, optim=optim, freeze_vision=cfg.sft.freeze_vision)
    trainer = TrainerGroup(trainer_cfg, policy_dir, Objective(), cfg.sft.steps)
    try:
        batches = data.batches(cfg.sft.batch_size, cfg.sft.crop_batch_size, cfg.seed + 1)
        guard = SkipGuard(cfg.run.max_consecutive_skips)
        run_sft(trainer, batches, cfg.sft.steps, metrics_file=metrics_file, guard=guard)
        trainer.export(out_dir, "float32")
    finally:
        trainer.shutdown()
