"""A run that fails mid-way stops every actor it started: the job's three parts, ``setup``, ``train`` and
``cleanup`` (``cleanup`` in ``finally``), on a real Ray cluster in this process.

The failures are real: a search mode the corpus has no index for stops setup once the retriever has started; an
SFT learning rate so large that the second step's loss is not finite, with ``run.max_consecutive_skips=1``, stops
the run inside the warm start, after the retriever, the reward actor and the warm start's trainer ranks have
started. Spies record the handles the real constructors return.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts the retriever, the reward actor and two trainer ranks on Ray

ROOT = Path(__file__).resolve().parents[2]


def config(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vrag_rl.main import register_recipes

    register_recipes()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def dead(handle, within_s: float = 30.0) -> bool:
    """Whether the actor is gone within ``within_s``: ``ray.kill`` returns before the actor has died."""
    import ray
    from ray.exceptions import RayActorError

    deadline = time.monotonic() + within_s
    while True:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=60)
        except RayActorError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


@pytest.fixture
def started(monkeypatch) -> list:
    """The handles of every retriever, reward actor and trainer rank started while the test runs."""
    import vrag_rl.learner.ranks as ranks
    import vrag_rl.retrieval.actor as retrieval_actor
    import vrag_rl.reward.actor as reward_actor

    started = []

    def spy(start, handle_of):
        def wrapped(*args, **kwargs):
            made = start(*args, **kwargs)
            started.append(handle_of(made))
            return made

        return wrapped

    class SpiedGroup(ranks.TrainerGroup):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.extend(self.ranks)

    monkeypatch.setattr(
        retrieval_actor, "start_retriever_actor", spy(retrieval_actor.start_retriever_actor, lambda h: h)
    )
    monkeypatch.setattr(reward_actor, "start_reward_actor", spy(reward_actor.start_reward_actor, lambda s: s.handle))
    monkeypatch.setattr(ranks, "TrainerGroup", SpiedGroup)
    return started


def test_a_setup_failing_after_the_retriever_started_stops_it(ray_session, started, tiny_dirs, tmp_path):
    from vrag_rl.job.grpo import run

    cfg = config(
        ["+recipe=tiny_cpu", f"models.tiny_dir={tiny_dirs['policy'].parent}", "rollout.agent.search_mode=dense"]
    )
    with pytest.raises(ValueError, match="search_mode=dense needs an index this corpus lacks"):
        run(cfg, tmp_path / "run")
    assert len(started) == 1 and dead(started[0])  # the retriever; nothing after it started
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_run_failing_in_its_warm_start_stops_every_actor_it_started(
    ray_session, started, warm_policy, tiny_dirs, tmp_path
):
    from vrag_rl.job.grpo import run

    cfg = config(
        [
            "+recipe=tiny_cpu",
            f"models.policy={warm_policy}",
            f"models.tiny_dir={tiny_dirs['policy'].parent}",
            "sft.steps=3",
            "sft.batch_size=1",
            "sft.crop_batch_size=0",
            "sft.warmup_steps=0",
            "sft.lr=1e30",
            "run.max_consecutive_skips=1",
            "tracking.wandb=disabled",
        ]
    )
    with pytest.raises(FloatingPointError, match="1 optimizer updates in a row"):
        run(cfg, tmp_path / "run")
    assert len(started) == 4  # the retriever, the reward actor and two trainer ranks
    assert all(dead(h) for h in started)
