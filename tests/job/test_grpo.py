"""One GRPO step in one process, without Ray: ``grpo_step`` with the local trainer, an in-process vLLM rollout
worker over the warm-started tiny policy, the bundled corpus's BM25 search and the real reward scorer.

The step runs in a fresh interpreter (this file is also the script it runs): vLLM scans the modules loaded
in its process when it starts and fails on numba, which other tests of this session import (ranx).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a GRPO step with an in-process vLLM engine in a subprocess

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "+recipe=tiny_cpu",
    "algo.prompts_per_step=2",
    "algo.group_size=4",
    "algo.mini_batches=2",
    "algo.kl_coef=0.01",  # the reference policy and the KL term take part too
    "algo.is_level=token",  # and importance weights from the engine's log-probs to the trainer's
    "sampling.max_tokens=64",
    "sampling.temperature=1.0",
]


def run_one_step(policy: str, retriever_model: str, out: Path) -> None:
    """The script: one ``grpo_step`` in this process; its result and weight checks to ``out`` as JSON."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vrag_rl.data.paths import BUNDLED_CORPUS
    from vrag_rl.data.records import load_qa
    from vrag_rl.job.grpo import split_questions
    from vrag_rl.job.lookahead import StepBatch, step_tasks
    from vrag_rl.job.step import grpo_step, objective
    from vrag_rl.learner.trainer import LocalTrainer
    from vrag_rl.main import register_recipes
    from vrag_rl.retrieval.corpus_index import open_retriever
    from vrag_rl.reward.actor import RewardScorer
    from vrag_rl.rollout.worker import RolloutWorker

    register_recipes()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=OVERRIDES))
    cfg.rollout.model_dir = policy
    train, _ = split_questions(load_qa(BUNDLED_CORPUS), cfg)
    retriever = open_retriever(BUNDLED_CORPUS, None, retriever_model)
    worker = RolloutWorker(cfg.rollout, retriever=retriever)
    trainer = LocalTrainer(cfg.trainer, policy, objective(cfg), total_steps=2)
    before = {k: v.detach().clone() for k, v in trainer.policy.model.named_parameters()}
    batch = StepBatch(1, train[:2], worker.rollout(step_tasks(1, train[:2], cfg), cfg.sampling), 0.0, {})
    result = grpo_step(batch, worker, RewardScorer(cfg.reward), trainer, cfg)
    after = dict(trainer.policy.model.named_parameters())
    language = [k for k in before if ".visual." not in k]  # the vision tower has no gradient without images
    out.write_text(
        json.dumps(
            {
                "metrics": result.metrics,
                "group_ids": result.group_ids,
                "rewards": [b.total for b in result.rewards],
                "advantages": result.advantages,
                "language_changed": sum(not torch.equal(before[k], after[k]) for k in language),
                "language_parameters": len(language),
                "parameter_bytes": sum(v.numel() * v.element_size() for v in before.values()),
            }
        )
    )


def test_one_grpo_step_in_process(warm_policy, tiny_dirs, tmp_path):
    from tests.conftest import CACHE

    out = tmp_path / "step.json"
    proc = subprocess.run(
        [sys.executable, __file__, str(warm_policy), str(tiny_dirs["retriever"]), str(out)],
        cwd=ROOT,
        env={**os.environ, "VRAG_RL_CACHE": str(CACHE)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    metrics = got["metrics"]
    for key in (
        "train/reward",
        "train/ndcg",
        "train/format",
        "train/finish_rate",
        "train/invalid_rate",
        "actor/pg_loss",
        "actor/kl",
        "actor/entropy",
        "actor/grad_norm",
        "actor/pg_clipfrac",
        "actor/lr",
        "time/rollout_s",
        "time/update_s",
        "perf/weight_sync_bytes",
        "reward/mean_advantage_abs",
    ):
        assert key in metrics, key
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    # The engine and the trainer (both float32 here) read the sampled tokens alike: weights of about 1.
    assert 0 < metrics["offpolicy/mismatch_token_abs_max"] < 0.05, metrics
    assert metrics["offpolicy/mismatch_turn_abs_mean"] > 0 and metrics["offpolicy/mismatch_token_kl_k3"] >= 0
    assert abs(metrics["offpolicy/is_mean"] - 1) < 0.01 and metrics["offpolicy/is_ess"] > 0.99, metrics
    assert metrics["train/searches"] > 0 and metrics["actor/grad_norm"] > 0
    # 2 questions x 4 samples; advantages are zero-mean within each group, and not all zero.
    assert sorted(set(got["group_ids"])) == [0, 1] and len(got["advantages"]) == 8
    for g in (0, 1):
        adv = [a for a, i in zip(got["advantages"], got["group_ids"]) if i == g]
        assert len(adv) == 4 and abs(sum(adv)) < 1e-5
    assert any(abs(a) > 0.1 for a in got["advantages"]), got["rewards"]
    # Two updates moved every weight of the language model, and the engine loaded every weight.
    assert got["language_changed"] == got["language_parameters"]
    assert metrics["perf/weight_sync_bytes"] == got["parameter_bytes"]


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    import vrag_rl  # noqa: F401  (the torchvision hook before transformers)

    run_one_step(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
