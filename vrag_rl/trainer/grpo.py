"""GRPO training of the search-and-crop agent on Ray: the single controller, top to bottom.

    python -m vrag_rl.main +recipe=tiny_cpu

``run`` is the whole job:

1. Models and data: the policy and retriever checkpoints (the tiny kit by default), the corpus's questions
   split into training and held-out validation questions, the page index (the corpus's cached index if none
   is given, built when needed).
2. Actors: the retriever (sharded index), the reward scorer (judge client inside), and, per phase, the trainer
   ranks (FSDP2) and the rollout workers (vLLM).
3. SFT warm start (``sft.steps`` > 0): supervised steps on expert trajectories of the training questions, on
   the trainer ranks; the result is exported as ``OUT/sft`` and is both GRPO's starting point and its KL
   reference.
4. GRPO: ``grpo_step`` per step, greedy validation on held-out questions every ``run.val_every`` steps,
   checkpoints every ``run.save_every`` steps and at the end, committed atomically (``checkpoint.py``); a
   rerun in the same directory with the same settings and data resumes from the newest one (model, optimizer,
   schedule, the ranks' RNG states, data position, step) and continues as the uninterrupted run would have;
   every sampling seed derives from (run seed, step). Other settings, or ``run.resume=false``, in a directory
   that holds a run stop at start, naming what differs.
5. The end: ``OUT/export`` (a Hugging Face checkpoint transformers and vLLM load), ``metrics.jsonl``,
   ``metrics.png``, the wandb run (offline unless configured).

``grpo_step`` is one step, given its collaborators (a ``RolloutBackend``, a ``Scorer``, a ``Trainer``): questions
→ ``algo.group_size`` seeded rollouts each → rewards → group advantages → old (and reference) log-probs →
``algo.epochs`` x ``algo.mini_batches`` updates → the new weights streamed into the rollout engines → the
step's metrics. It runs the same on Ray actors and in one process. An update with a non-finite loss or
gradient is skipped (``actor/skipped_updates``); ``run.max_consecutive_skips`` of them in a row stop the run.
Weights that are not finite are never streamed to the engines or saved: the step stops the run instead.
Rollout workers that die or hang mid-batch are started again, given the current weights, and the batch is
sampled again (``sample``): the step's result is the one it would have had.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from vrag_rl.algo.advantages import grpo_advantages, rloo_advantages
from vrag_rl.data.records import QARecord, holdout_split, load_qa
from vrag_rl.evaluation.metrics import Method, rollout_row
from vrag_rl.evaluation.report import table_metrics
from vrag_rl.reward.actor import Scorer
from vrag_rl.reward.score import NO_ANSWER, RewardBreakdown
from vrag_rl.rollout.agent_loop import Rollout, Task, make_groups
from vrag_rl.rollout.engine import SamplingConfig
from vrag_rl.rollout.scoring import judge_failures, rollout_metrics, score_rollouts
from vrag_rl.rollout.worker import RolloutBackend, WorkersRestarted
from vrag_rl.trainer.actor import SkipGuard, Trainer, TrainerGroup, response_tokens
from vrag_rl.trainer.batch import minibatches_by_group
from vrag_rl.trainer.checkpoint import FINGERPRINT, check_fingerprint, check_run_directory, fingerprint, save_checkpoint
from vrag_rl.trainer.config import TrainConfig
from vrag_rl.trainer.sampler import EpochSampler

log = logging.getLogger("vrag_rl.grpo")
VAL_TABLE = ("f1", "ndcg@10")  # validation's metrics per Table 1 cell, as the evaluation report has them
SFT_KEYS = ("seed", "models.", "data", "sft.", "trainer.", "rollout.agent.")  # the warm start's settings


@dataclass
class StepResult:
    """What one GRPO step did: its metrics, and per rollout its group, reward and advantage."""

    metrics: dict[str, float]
    group_ids: list[int]
    rewards: list[RewardBreakdown]
    advantages: list[float]
    skipped: list[bool]  # per optimizer update, in order: skipped for a non-finite loss or gradient


def grpo_step(
    step: int,
    questions: list[QARecord],
    rollouts: RolloutBackend,
    scorer: Scorer,
    trainer: Trainer,
    cfg: TrainConfig,
) -> StepResult:
    """One GRPO step on ``questions`` (a group of ``algo.group_size`` samples each); see the module docstring."""
    algo, times = cfg.algo, {}
    t0 = time.perf_counter()
    # Seeds depend on the step only, so a resumed run samples what the straight run sampled.
    tasks = make_groups([(r.qid, r.question) for r in questions], algo.group_size, seed=cfg.seed * 1_000_003 + step)
    batch = sample(rollouts, trainer, tasks, cfg.sampling)
    times["time/rollout_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rewards = score_rollouts(scorer, {r.qid: r for r in questions}, batch)
    totals = torch.tensor([b.total for b in rewards], dtype=torch.float32)
    group_ids = [r.task.group for r in batch]
    if algo.advantage == "grpo":
        advantages = grpo_advantages(totals, group_ids, norm_by_std=algo.norm_by_std).tolist()
    else:
        advantages = rloo_advantages(totals, group_ids).tolist()
    times["time/reward_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    trajectories = [r.trajectory for r in batch]
    temperature = cfg.sampling.logprob_temperature
    old = None  # "update": the update's own forward stands for the weights that sampled
    if algo.old_logprobs == "recompute":
        old = trainer.logprobs(trajectories, temperature)
    elif algo.old_logprobs == "rollout":
        old = [torch.tensor([lp for lp, m in zip(t.sampled_logprobs, t.response_mask) if m]) for t in trajectories]
    ref = trainer.logprobs(trajectories, temperature, reference=True) if algo.kl_coef > 0 else None
    times["time/logprobs_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    update: dict[str, float] = {}
    skipped: list[bool] = []
    rng = random.Random(cfg.seed * 7_919 + step)
    for _ in range(algo.epochs):
        for idx in minibatches_by_group(group_ids, algo.mini_batches, rng):
            metrics = trainer.grpo_update(
                [trajectories[i] for i in idx],
                [advantages[i] for i in idx],
                [old[i] for i in idx] if old else None,
                [ref[i] for i in idx] if ref else None,
                algo,
                temperature,
            )
            skipped.append(metrics.pop("skipped_updates") > 0)
            for k, v in metrics.items():
                update[k] = update.get(k, 0.0) + v / (algo.epochs * algo.mini_batches)
    lr = trainer.end_step()
    times["time/update_s"] = time.perf_counter() - t0

    if not trainer.weights_finite():
        raise FloatingPointError(f"step {step}: the policy's weights are not finite; not syncing or saving them")
    sync = trainer.sync_weights(rollouts)
    step_s = sum(times.values()) + sync.seconds
    metrics = {
        **rollout_metrics(batch, rewards, "train/"),
        **{f"actor/{k}": v for k, v in update.items()},
        "actor/lr": lr,
        "actor/skipped_updates": float(sum(skipped)),
        **times,
        "time/step_s": step_s,
        "perf/tokens_per_s": response_tokens(trajectories) / step_s,
        "perf/weight_sync_s": sync.seconds,
        "perf/weight_sync_bytes": float(sync.bytes),
        "reward/mean_advantage_abs": sum(abs(a) for a in advantages) / len(advantages),
    }
    return StepResult(metrics, group_ids, rewards, advantages, skipped)


def sample(rollouts: RolloutBackend, trainer: Trainer, tasks: list[Task], sampling: SamplingConfig) -> list[Rollout]:
    """Rollouts of ``tasks``; when rollout workers had to be restarted mid-batch (they died or hung), the current
    weights are streamed into them and the batch runs again, sampling what it would have (seeded tasks)."""
    try:
        return rollouts.rollout(tasks, sampling)
    except WorkersRestarted as err:
        log.warning("%s: streaming the current weights and sampling the batch again", err)
        trainer.sync_weights(rollouts)
        return rollouts.rollout(tasks, sampling)


def split_questions(records: list[QARecord], cfg: TrainConfig) -> tuple[list[QARecord], list[QARecord]]:
    """(training, validation): every ``data.holdout_every``-th question is held out."""
    train, held = holdout_split(records, cfg.data.holdout_every)
    return train, held[: cfg.data.max_val_questions]


def run(cfg: TrainConfig, out: Path) -> dict:
    import ray

    from vrag_rl.models.tiny import TinyConfig, build_tiny_models
    from vrag_rl.retrieval.actor import start_retriever_actor
    from vrag_rl.retrieval.cache import ensure_dense_index, ensure_index
    from vrag_rl.retrieval.embed import EmbedderConfig
    from vrag_rl.reward.actor import start_reward_actor
    from vrag_rl.reward.judge_server import start_judge_server
    from vrag_rl.rollout.worker import RolloutPool
    from vrag_rl.trainer.tracking import Tracker, read_metrics

    t_start = time.perf_counter()
    if cfg.judge is not None:
        cfg.judge.api_key()  # an unset key variable fails here, before anything starts
    current = fingerprint(cfg)
    resume = check_run_directory(out, cfg.run.resume, current)  # refuses a directory of another run
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
    index = ensure_index(corpus, cfg.data.index, retriever_dir)

    # 2. Actors that live for the whole run.
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    dense = ensure_dense_index(corpus, cfg.data.dense_index, cfg.models.dense) if cfg.models.dense else None
    retriever = start_retriever_actor(str(corpus), str(index), embedder, cfg.retriever, dense=dense)
    modes = [str(m) for m in ray.get(retriever.modes.remote())]
    if cfg.rollout.agent.search_mode not in modes:  # here, not at the first search inside a rollout worker
        raise ValueError(
            f"rollout.agent.search_mode={cfg.rollout.agent.search_mode} needs an index this corpus lacks; its "
            f"retriever has {modes} (OCR the corpus for text, set models.dense for dense)"
        )
    log.info("retriever modes: %s", ", ".join(modes))
    judge_server, judge = None, cfg.judge
    if judge is not None and judge.model_dir:  # a judge the job serves itself
        judge_server, judge = start_judge_server(judge, out / "judge_server.log")
    scorer = start_reward_actor(cfg.reward, judge)
    state = json.loads((resume / "controller.json").read_text()) if resume else {"step": 0}
    tracker = Tracker(
        out, cfg.tracking, config=json.loads(json.dumps(asdict(cfg), default=str)), resume_step=state["step"]
    )

    # 3. SFT warm start (its fingerprint, written last, marks it complete).
    start_dir = policy_dir
    if cfg.sft.steps:
        start_dir, sft_print = str(out / "sft"), {k: v for k, v in current.items() if k.startswith(SFT_KEYS)}
        if (out / "sft" / FINGERPRINT).is_file():
            check_fingerprint(out / "sft", sft_print, "the supervised warm start")
        else:
            shutil.rmtree(out / "sft", ignore_errors=True)
            sft_warm_start(cfg, policy_dir, corpus, train_qa, out / "sft", out / "sft_metrics.jsonl")
            (out / "sft" / FINGERPRINT).write_text(json.dumps(sft_print, indent=1, sort_keys=True))

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
    bar = tqdm(total=cfg.run.steps, initial=step, desc="grpo", unit="step")
    # A resume with no step left (killed after the last save) still reports the last step's metrics.
    last = {k: v for k, v in (read_metrics(out / "metrics.jsonl") or [{}])[-1].items() if k != "step"} if step else {}
    guard = SkipGuard(cfg.run.max_consecutive_skips)
    while step < cfg.run.steps:
        step += 1
        questions = [grpo_qa[i] for i in sampler.take(cfg.algo.prompts_per_step)]
        result = grpo_step(step, questions, pool, scorer, trainer, cfg)
        check_judge(result.rewards, cfg, f"GRPO step {step}")
        for k, skipped in enumerate(result.skipped):
            guard.record(skipped, f"GRPO step {step}, update {k + 1}")
        last = result.metrics
        if val_qa and cfg.run.val_every and (step % cfg.run.val_every == 0 or step == cfg.run.steps):
            last |= validate(pool, scorer, trainer, val_qa, cfg, step)
        tracker.log(step, last)
        bar.set_postfix(reward=f"{last['train/reward']:.3f}", ndcg=f"{last['train/ndcg']:.3f}")
        bar.update(1)
        if step == cfg.run.steps or (cfg.run.save_every and step % cfg.run.save_every == 0):
            save_checkpoint(out, step, trainer, sampler, cfg.run.keep_checkpoints, current)
    bar.close()

    # 5. The end.
    trainer.export(out / "export", cfg.run.export_dtype)
    tracker.close()
    pool.shutdown()
    trainer.shutdown()
    ray.kill(retriever)
    scorer.shutdown()
    if judge_server is not None:
        ray.get(judge_server.stop.remote())
        ray.kill(judge_server)
    summary = {
        "steps": cfg.run.steps,
        "final": last,
        "seconds": time.perf_counter() - t_start,
        "export": str(out / "export"),
        "out_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def check_judge(rewards: list[RewardBreakdown], cfg: TrainConfig, where: str) -> None:
    """Stop the run when more answers than ``judge.max_error_rate`` could not be judged: training on, with
    every such answer scored 0, would optimise NDCG and format alone without saying so."""
    failures = judge_failures(rewards)
    answered = sum(b.answer_status != NO_ANSWER for b in rewards)
    if cfg.judge is None or not answered or sum(failures.values()) / answered <= cfg.judge.max_error_rate:
        return
    statuses = ", ".join(f"{n} {status}" for status, n in failures.most_common())
    judge = cfg.judge.base_url or cfg.judge.model_dir
    raise RuntimeError(
        f"{where}: the judge at {judge} failed on {sum(failures.values())} of {answered} answers "
        f"({statuses}), over judge.max_error_rate={cfg.judge.max_error_rate}: stopping"
    )


def validate(
    rollouts: RolloutBackend, scorer: Scorer, trainer: Trainer, val_qa: list[QARecord], cfg: TrainConfig, step: int
) -> dict[str, float]:
    """Greedy rollouts on the held-out questions; metrics over all (``val/``), per data source
    (``val/SOURCE/``), and the evaluation report's Table 1 cells of ``VAL_TABLE`` (``val/table/CELL/METRIC``,
    computed by the evaluation's own code: ``evaluation.metrics.rollout_row`` and ``report.metric_table``)."""
    tasks = make_groups([(r.qid, r.question) for r in val_qa], 1, seed=cfg.seed)
    batch = sample(rollouts, trainer, tasks, replace(cfg.sampling, temperature=0.0))
    by_qid = {r.qid: r for r in val_qa}
    rewards = score_rollouts(scorer, by_qid, batch)
    check_judge(rewards, cfg, f"validation at step {step}")
    metrics = rollout_metrics(batch, rewards, "val/")
    for source in sorted({r.data_source for r in val_qa}):
        mine = [i for i, r in enumerate(batch) if by_qid[r.task.qid].data_source == source]
        metrics |= rollout_metrics([batch[i] for i in mine], [rewards[i] for i in mine], f"val/{source}/")
    rows = [rollout_row(r, by_qid[r.task.qid], Method.AGENT, None, with_judge=False) for r in batch]
    return metrics | table_metrics(rows, VAL_TABLE, "val/table/")


def sft_warm_start(
    cfg: TrainConfig, policy_dir: str, corpus: Path, train_qa: list[QARecord], out_dir: Path, metrics_file: Path
) -> None:
    """Supervised steps on expert trajectories of the training questions and on teacher trajectories
    (``sft.expert``, ``sft.teacher_data``; ``trainer.sft``) on the trainer ranks, with a cosine schedule;
    exported to ``out_dir``."""
    from transformers import AutoProcessor

    from vrag_rl.agent.chat import ChatEncoder
    from vrag_rl.evaluation.teacher import load_recordings
    from vrag_rl.trainer.settings import OptimConfig
    from vrag_rl.trainer.sft import ExpertData, run_sft

    agent = cfg.rollout.agent
    data = ExpertData(
        train_qa,
        corpus,
        ChatEncoder(AutoProcessor.from_pretrained(policy_dir)),
        prompt=agent.prompt,
        budget=agent.budget,
        max_length=agent.max_length,
        expert=cfg.sft.expert,
        teacher=load_recordings(Path(cfg.sft.teacher_data)) if cfg.sft.teacher_data else [],
        agent=agent,
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
    run_sft(
        trainer,
        data,
        cfg.sft.steps,
        cfg.sft.batch_size,
        cfg.sft.crop_batch_size,
        cfg.seed + 1,
        metrics_file,
        SkipGuard(cfg.run.max_consecutive_skips),
    )
    trainer.export(out_dir, "float32")
    trainer.shutdown()
