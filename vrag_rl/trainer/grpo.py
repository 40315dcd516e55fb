"""GRPO training of the search-and-crop agent on Ray: the single controller, top to bottom.

    python -m vrag_rl.main +recipe=tiny_cpu

1. Models and data: the policy and retriever checkpoints (the tiny kit by default), the corpus's questions
   split into training and held-out validation questions, the page index (built into the cache if needed).
2. Actors: the retriever (sharded index), the reward scorer (judge client inside), and, per phase, the trainer
   ranks (FSDP2) and the rollout workers (vLLM).
3. SFT warm start (``sft.steps`` > 0): supervised steps on expert trajectories of the training questions, on
   the trainer ranks; the result is exported as ``OUT/sft`` and is both GRPO's starting point and its KL
   reference.
4. GRPO, each step: questions → rollout workers (``algo.group_size`` seeded samples each) → rewards →
   reference and old log-probs → group advantages → ``algo.epochs`` x ``algo.mini_batches`` updates → the
   new weights streamed into every rollout engine → metrics. Greedy validation on held-out questions every
   ``run.val_every`` steps. Checkpoints every ``run.save_every`` steps and at the end; a rerun in the same
   directory resumes from the newest one (model, optimizer, schedule, the ranks' RNG states, data position,
   step) and continues as the uninterrupted run would have; every sampling seed derives from (run seed, step).
5. The end: ``OUT/export`` (a Hugging Face checkpoint transformers and vLLM load), ``metrics.jsonl``,
   ``metrics.png``, the wandb run (offline unless configured).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vrag_rl.algo.advantages import grpo_advantages, rloo_advantages
from vrag_rl.config import TrainConfig
from vrag_rl.data.records import QARecord, holdout_split, load_qa
from vrag_rl.rollout.agent_loop import make_groups
from vrag_rl.trainer.sampler import EpochSampler

log = logging.getLogger("vrag_rl.grpo")
CHECKPOINT = "step-{:06d}"


def split_questions(records: list[QARecord], cfg: TrainConfig) -> tuple[list[QARecord], list[QARecord]]:
    """(training, validation): every ``data.holdout_every``-th question is held out."""
    train, held = holdout_split(records, cfg.data.holdout_every)
    return train, held[: cfg.data.max_val_questions]


def finished_checkpoints(out: Path) -> list[Path]:
    """Checkpoints in step order; one counts once its controller.json exists (written last)."""
    return sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "controller.json").exists())


def newest_checkpoint(out: Path) -> Path | None:
    done = finished_checkpoints(out)
    return done[-1] if done else None


def rollout_metrics(rollouts, rewards: list[dict], prefix: str) -> dict[str, float]:
    n = len(rollouts)
    actions = sum(len(r.actions) for r in rollouts)
    return {
        f"{prefix}reward": sum(b["total"] for b in rewards) / n,
        f"{prefix}ndcg": sum(b["ndcg"] for b in rewards) / n,
        f"{prefix}answer": sum(b["answer"] for b in rewards) / n,
        f"{prefix}format": sum(b["format"] for b in rewards) / n,
        f"{prefix}invalid_rate": sum(r.num_invalid for r in rollouts) / max(actions, 1),
        f"{prefix}finish_rate": sum(r.finished for r in rollouts) / n,
        f"{prefix}turns": sum(r.num_turns for r in rollouts) / n,
        f"{prefix}searches": sum(r.num_searches for r in rollouts) / n,
        f"{prefix}response_tokens": sum(sum(r.trajectory.response_mask) for r in rollouts) / n,
    }


def run(cfg: TrainConfig, out: Path) -> dict:
    import ray

    from vrag_rl.models.tiny import TinyConfig, build_tiny_models
    from vrag_rl.retrieval.actor import ActorConfig, start_retriever_actor
    from vrag_rl.retrieval.embed import EmbedderConfig
    from vrag_rl.reward.actor import RewardScorer
    from vrag_rl.rollout.watch import ensure_index
    from vrag_rl.rollout.worker import RolloutPool
    from vrag_rl.trainer.actor import TrainerGroup
    from vrag_rl.trainer.tracking import Tracker

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # 1. Models and data.
    if cfg.models.policy is None or cfg.models.retriever is None:
        tiny = build_tiny_models(cfg.models.tiny_dir, TinyConfig(seed=cfg.models.tiny_seed))
    policy_dir = cfg.models.policy or str(tiny["policy"])
    retriever_dir = cfg.models.retriever or str(tiny["retriever"])
    corpus = Path(cfg.data.corpus)
    train_qa, val_qa = split_questions(load_qa(corpus), cfg)
    if not train_qa:
        raise ValueError(f"{corpus} has no training questions")
    embedder = EmbedderConfig(
        model_dir=retriever_dir, device="cpu", dtype="float32", batch_size=cfg.retriever.embed_batch_size
    )
    index = ensure_index(corpus, Path(cfg.data.index) if cfg.data.index else None, retriever_dir)

    # 2. Actors that live for the whole run.
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    retriever = start_retriever_actor(
        str(corpus),
        str(index),
        embedder,
        num_cpus=cfg.retriever.num_cpus,
        actors=ActorConfig(num_shard_actors=cfg.retriever.shard_actors, num_cpus=cfg.retriever.num_cpus),
    )
    scorer = ray.remote(RewardScorer).options(num_cpus=0.1).remote(cfg.reward, cfg.judge)
    resume = newest_checkpoint(out) if cfg.run.resume else None
    state = json.loads((resume / "controller.json").read_text()) if resume else {"step": 0}
    tracker = Tracker(
        out, cfg.tracking, config=json.loads(json.dumps(asdict(cfg), default=str)), resume_step=state["step"]
    )

    # 3. SFT warm start.
    start_dir = policy_dir
    if cfg.sft.steps:
        start_dir = str(out / "sft")
        if not (out / "sft" / "config.json").exists():
            sft_warm_start(cfg, policy_dir, corpus, train_qa, out / "sft", out / "sft_metrics.jsonl")

    # 4. GRPO.
    trainer = TrainerGroup(cfg.trainer, start_dir, cfg.run.steps, with_reference=cfg.algo.kl_coef > 0)
    pool = RolloutPool(replace(cfg.rollout, model_dir=start_dir), retriever, str(corpus))
    grpo_qa = train_qa[: cfg.data.max_grpo_questions]
    sampler = EpochSampler(len(grpo_qa), cfg.seed)
    step = 0
    if resume is not None:
        trainer.load(resume / "trainer")
        step = state["step"]
        sampler.restore(state["sampler"])
        trainer.sync_weights(pool)
        log.info("resumed from %s (step %d)", resume, step)
    by_qid = {r.qid: r for r in train_qa + val_qa}
    bar = tqdm(total=cfg.run.steps, initial=step, desc="grpo", unit="step")
    last: dict[str, float] = {}
    while step < cfg.run.steps:
        step += 1
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        questions = [grpo_qa[i] for i in sampler.take(cfg.algo.prompts_per_step)]
        # Seeds depend on the step only, so a resumed run samples what the straight run sampled.
        tasks = make_groups(
            [(r.qid, r.question) for r in questions], cfg.algo.group_size, seed=cfg.seed * 1_000_003 + step
        )
        rollouts = pool.rollout(tasks, cfg.sampling)
        times["time/rollout_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rewards = score_rollouts(scorer, by_qid, rollouts)
        totals = torch.tensor([b["total"] for b in rewards], dtype=torch.float32)
        group_ids = [r.task.group for r in rollouts]
        if cfg.algo.advantage == "grpo":
            advantages = grpo_advantages(totals, group_ids, norm_by_std=cfg.algo.norm_by_std).tolist()
        else:
            advantages = rloo_advantages(totals, group_ids).tolist()
        times["time/reward_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        trajectories = [r.trajectory for r in rollouts]
        temperature = cfg.sampling.logprob_temperature
        if cfg.algo.old_logprobs == "recompute":
            old = trainer.logprobs(trajectories, temperature)
        else:
            old = [torch.tensor([lp for lp, m in zip(t.sampled_logprobs, t.response_mask) if m]) for t in trajectories]
        ref = trainer.logprobs(trajectories, temperature, reference=True) if cfg.algo.kl_coef > 0 else None
        times["time/logprobs_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        update: dict[str, float] = {}
        groups = sorted(set(group_ids))
        rng = random.Random(cfg.seed * 7_919 + step)
        for _ in range(cfg.algo.epochs):
            order = rng.sample(groups, len(groups))
            for part in np.array_split(np.array(order), cfg.algo.mini_batches):
                chosen = set(part.tolist())
                idx = [i for i, g in enumerate(group_ids) if g in chosen]
                metrics = trainer.grpo_update(
                    [trajectories[i] for i in idx],
                    [advantages[i] for i in idx],
                    [old[i] for i in idx],
                    [ref[i] for i in idx] if ref else None,
                    cfg.algo,
                    temperature,
                )
                for k, v in metrics.items():
                    update[k] = update.get(k, 0.0) + v / (cfg.algo.epochs * cfg.algo.mini_batches)
        lr = trainer.end_step()
        times["time/update_s"] = time.perf_counter() - t0

        sync = trainer.sync_weights(pool)
        generated = sum(sum(t.response_mask) for t in trajectories)
        step_s = sum(times.values()) + sync["weight_sync_s"]
        last = {
            **rollout_metrics(rollouts, rewards, "train/"),
            **{f"actor/{k}": v for k, v in update.items()},
            "actor/lr": lr,
            **times,
            "time/step_s": step_s,
            "perf/tokens_per_s": generated / step_s,
            "perf/weight_sync_s": sync["weight_sync_s"],
            "perf/weight_sync_bytes": sync["weight_sync_bytes"],
            "reward/mean_advantage_abs": sum(abs(a) for a in advantages) / len(advantages),
        }
        if val_qa and cfg.run.val_every and (step % cfg.run.val_every == 0 or step == cfg.run.steps):
            last |= validate(pool, scorer, val_qa, cfg)
        tracker.log(step, last)
        bar.set_postfix(reward=f"{last['train/reward']:.3f}", ndcg=f"{last['train/ndcg']:.3f}")
        bar.update(1)
        if step == cfg.run.steps or (cfg.run.save_every and step % cfg.run.save_every == 0):
            save_checkpoint(out, step, trainer, sampler, cfg.run.keep_checkpoints)
    bar.close()

    # 5. The end.
    trainer.export(out / "export", cfg.run.export_dtype)
    tracker.close()
    pool.shutdown()
    trainer.shutdown()
    ray.kill(retriever)
    ray.kill(scorer)
    summary = {
        "steps": cfg.run.steps,
        "final": last,
        "seconds": time.perf_counter() - t_start,
        "export": str(out / "export"),
        "out_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def score_rollouts(scorer, by_qid: dict[str, QARecord], rollouts) -> list[dict]:
    """Reward breakdowns from the reward actor, one per rollout."""
    import ray

    from vrag_rl.reward.actor import rollout_summary

    return ray.get(scorer.score.remote([(by_qid[r.task.qid], rollout_summary(r)) for r in rollouts]))


def validate(pool, scorer, val_qa: list[QARecord], cfg: TrainConfig) -> dict[str, float]:
    """Greedy rollouts on the held-out questions; metrics over all (``val/``) and per data source
    (``val/SOURCE/``)."""
    tasks = make_groups([(r.qid, r.question) for r in val_qa], 1, seed=cfg.seed)
    rollouts = pool.rollout(tasks, replace(cfg.sampling, temperature=0.0))
    by_qid = {r.qid: r for r in val_qa}
    rewards = score_rollouts(scorer, by_qid, rollouts)
    metrics = rollout_metrics(rollouts, rewards, "val/")
    for source in sorted({r.data_source for r in val_qa}):
        mine = [i for i, r in enumerate(rollouts) if by_qid[r.task.qid].data_source == source]
        metrics |= rollout_metrics([rollouts[i] for i in mine], [rewards[i] for i in mine], f"val/{source}/")
    return metrics


def save_checkpoint(out: Path, step: int, trainer, sampler: EpochSampler, keep: int) -> Path:
    """Trainer state (sharded), then the controller's; a checkpoint counts once controller.json exists."""
    path = out / "checkpoints" / CHECKPOINT.format(step)
    shutil.rmtree(path, ignore_errors=True)
    (path / "trainer").mkdir(parents=True)
    trainer.save(path / "trainer")
    state = {"step": step, "sampler": sampler.state()}  # every seed derives from (run seed, step)
    (path / "controller.json").write_text(json.dumps(state))
    for old in finished_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def sft_warm_start(
    cfg: TrainConfig, policy_dir: str, corpus: Path, train_qa: list[QARecord], out_dir: Path, metrics_file: Path
) -> None:
    """Supervised steps on expert trajectories of the training questions (``trainer.sft``) on the trainer
    ranks, with a cosine schedule; exported to ``out_dir``."""
    from transformers import AutoProcessor

    from vrag_rl.agent.chat import ChatEncoder
    from vrag_rl.trainer.actor import TrainerGroup
    from vrag_rl.trainer.policy import OptimConfig
    from vrag_rl.trainer.sft import ExpertData, run_sft

    agent = cfg.rollout.agent
    data = ExpertData(
        train_qa,
        corpus,
        ChatEncoder(AutoProcessor.from_pretrained(policy_dir)),
        prompt=agent.prompt,
        budget=agent.budget,
        max_length=agent.max_length,
    )
    optim = OptimConfig(
        lr=cfg.sft.lr, warmup_steps=cfg.sft.warmup_steps, schedule="cosine", grad_clip=cfg.trainer.optim.grad_clip
    )
    trainer = TrainerGroup(
        replace(cfg.trainer, optim=optim, freeze_vision=cfg.sft.freeze_vision),
        policy_dir,
        cfg.sft.steps,
        with_reference=False,
    )
    run_sft(trainer, data, cfg.sft.steps, cfg.sft.batch_size, cfg.sft.crop_batch_size, cfg.seed + 1, metrics_file)
    trainer.export(out_dir, "float32")
    trainer.shutdown()
