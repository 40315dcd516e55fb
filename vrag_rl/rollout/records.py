"""What the agent loop samples: ``Task`` (a trajectory to sample, seeded), ``Rollout`` (what it became) and
``StopReason`` (why it ended)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vrag_rl.agent.actions import Action, ActionKind
from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.choice import Choice


class StopReason(Choice):
    """Why a trajectory ended."""

    ANSWER = "answer"  # it answered
    TURN_LIMIT = "turn_limit"  # the final answer-only turn did not answer
    LENGTH = "length"  # the next piece would have passed max_length
    TIMEOUT = "timeout"  # a turn or a search took longer than its limit (agent.turn_timeout_s, search_timeout_s)


@dataclass(frozen=True)
class Task:
    """One trajectory to sample: the question, its GRPO group and its place in the group."""

    qid: str
    question: str
    group: int = 0
    sample: int = 0
    seed: int | None = None  # sampling seed of the trajectory; each turn derives its own from it
    context: tuple[str, ...] | None = None  # single-turn: these pages are shown with the question, then an answer


def make_groups(questions: list[tuple[str, str]], n: int, seed: int | None, first_group: int = 0) -> list[Task]:
    """``n`` tasks per (qid, question), tied by a group id; seeds differ per sample and are reproducible."""
    if n < 1:
        raise ValueError(f"group size must be >= 1, got {n}")
    tasks = []
    for g, (qid, question) in enumerate(questions, start=first_group):
        for k in range(n):
            task_seed = None if seed is None else derive_seed(seed, g, k)
            tasks.append(Task(qid, question, g, k, task_seed))
    return tasks


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass
class Rollout:
    """A finished (or stopped) trajectory and what the reward and the logs need to know about it."""

    task: Task
    trajectory: Trajectory
    texts: list[str] = field(default_factory=list)  # decoded assistant turns, in order
    actions: list[Action] = field(default_factory=list)
    retrieved_pages: list[str] = field(default_factory=list)  # pages searches showed the model, in order
    crops: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)  # (page, raw box)
    # What searches and crops showed, in order: (turn that asked for it, page, raw crop box or None for a page).
    views: list[tuple[int, str, tuple[int, int, int, int] | None]] = field(default_factory=list)
    engine_errors: list[str] = field(default_factory=list)  # turns the engine failed to produce, and why
    versions: list[int] = field(default_factory=list)  # per assistant turn: the policy version that sampled it
    answer: str | None = None
    num_invalid: int = 0
    stop_reason: StopReason | None = None  # set when the trajectory ends

    @property
    def finished(self) -> bool:
        return self.stop_reason == StopReason.ANSWER

    @property
    def num_turns(self) -> int:
        return len(self.texts)

    @property
    def num_searches(self) -> int:
        return sum(a.kind == ActionKind.SEARCH for a in self.actions)

    def cited_pages(self) -> list[str]:
        """The pages the answer rests on: what was looked at last before answering (the last page or crop shown);
        a single-turn task's answer rests on every page it was given."""
        if self.answer is None:
            return []
        if self.task.context is not None:
            return list(self.retrieved_pages)
        return [self.views[-1][1]] if self.views else []
