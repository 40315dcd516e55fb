"""GRPO training of the search-and-crop agent on Ray: the single controller, top to bottom.

    python -m vrag_rl.main +recipe=tiny_cpu

``run`` is the whole job, in three parts (``GrpoJob``): ``setup`` (1-2), ``train`` (3-5) and ``cleanup``, which
stops every actor and server that setup started, also when a step fails.

1. Models and data: the policy and retriever checkpoints (the tiny kit by default), the corpus's questions
   split into training and held-out validation questions, the page index (the corpus's cached index if none
   is given, built when needed).
2. Actors: the retriever (sharded index), the reward scorer (judge client inside), the judge server when the
   job serves its own judge.
3. SFT warm start (``sft.steps`` > 0, ``sft.py``): supervised steps on expert trajectories of the training
   questions, on trainer ranks of its own; the result is exported as ``OUT/sft`` and is both GRPO's starting
   point and its KL reference.
4. GRPO: the trainer ranks (FSDP2 or ZeRO) and the rollout workers (vLLM); ``grpo_step`` per step (``job/step.py``),
   greedy validation on held-out questions every ``run.val_every`` steps, checkpoints every ``run.save_every`` steps
   and at the end, committed atomically (``checkpoint.py``). A rerun in the same directory with the same settings
   and data resumes from the newest one (model, optimizer, schedule, the ranks' RNG states, data position, step) and
   continues as the uninterrupted run would have; every sampling seed derives from (run seed, step). Other settings,
   or ``run.resume=false``, in a directory that holds a run stop at start, naming what differs.
5. The end: ``OUT/export`` (a Hugging Face checkpoint transformers and vLLM load), ``metrics.jsonl``,
   ``metrics.png``, the wandb run (offline unless configured).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from vrag_rl.data.records import QARecord, holdout_split, load_qa
from vrag_rl.evaluation.metrics import Method, rollout_row
from vrag_rl.evaluation.report import table_metrics
from vrag_rl.job.checkpoint import check_run_directory, fingerprint, save_checkpoint
from vrag_rl.job.config import TrainConfig
from vrag_rl.job.guard import SkipGuard
from vrag_rl.job.lookahead import Ledger, Lookahead, sample
from vrag_rl.job.sampler import EpochSampler
from vrag_rl.job.step import grpo_step, objective, sync_weights
from vrag_rl.learner.trainer import Trainer
from vrag_rl.progress import progress_bar
from vrag_rl.reward.actor import Scorer
from vrag_rl.reward.score import NO_ANSWER, RewardBreakdown
from vrag_rl.rollout.records import make_groups
from vrag_rl.rollout.scoring import judge_failures, rollout_metrics, score_rollouts
from vrag_rl.rollout.worker import RolloutBackend

log = logging.getLogger("vrag_rl.grpo")
VAL_TABLE = ("f1", "ndcg@10")  # validation's metrics per Table 1 cell, as the evaluation report has them


def split_questions(records: list[QARecord], cfg: TrainConfig) -> tuple[list[QARecord], list[QARecord]]:
    """(training, validation): every ``data.holdout_every``-th question is held out."""
    train, held = holdout_split(records, cfg.data.holdout_every)
    return train, held[: cfg.data.max_val_questions]


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
    engines: RolloutBackend, scorer: Scorer, trainer: Trainer, val_qa: list[QARecord], cfg: TrainConfig, step: int
) -> dict[str, float]:
    """Greedy rollouts on the held-out questions; metrics over all (``val/``), per data source
    (``val/SOURCE/``), and the evaluation report's Table 1 cells of ``VAL_TABLE`` (``val/table/CELL/METRIC``,
    computed by the evaluation's own code: ``evaluation.metrics.rollout_row`` and ``report.metric_table``)."""
    tasks = make_groups([(r.qid, r.question) for r in val_qa], 1, seed=cfg.seed)
    resync = lambda: sync_weights(trainer, engines, cfg.rollout.bucket_bytes, step)  # noqa: E731 (validation: after the step's sync)
    rollouts = sample(engines, tasks, replace(cfg.sampling, temperature=0.0), resync)
    by_qid = {r.qid: r for r in val_qa}
    rewards = score_rollouts(scorer, by_qid, rollouts)
    check_judge(rewards, cfg, f"validation at step {step}")
    metrics = rollout_metrics(rollouts, rewards, "val/")
    for source in sorted({r.data_source for r in val_qa}):
        mine = [i for i, r in enumerate(rollouts) if by_qid[r.task.qid].data_source == source]
        metrics |= rollout_metrics([rollouts[i] for i in mine], [rewards[i] for i in mine], f"val/{source}/")
    rows = [rollout_row(r, by_qid[r.task.qid], Method.AGENT, None, with_judge=False) for r in rollouts]
    return metrics | table_metrics(rows, VAL_TABLE, "val/table/")


def log_step(step: int, steps: int, metrics: dict[str, float]) -> None:
    """One line of the run's story per step (``main.log``): the training numbers, validation's when it ran."""
    line = "step %d/%d: reward %.3f, ndcg %.3f, finished %.2f, invalid %.2f, %.1fs"
    keys = ("train/reward", "train/ndcg", "train/finish_rate", "train/invalid_rate", "time/step_s")
    log.info(line, step, steps, *(metrics.get(k, float("nan")) for k in keys))
    if "val/ndcg" in metrics:
        keys = ("val/reward", "val/ndcg", "val/finish_rate")
        log.info("validation at step %d: reward %.3f, ndcg %.3f, finished %.2f", step, *(metrics[k] for k in keys))


class GrpoJob:
    """The job's three parts: ``setup`` starts what lives for the whole run, ``train`` runs it, ``cleanup`` stops
    whatever was started (each attribute is None until its part starts it)."""

    def __init__(self, cfg: TrainConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.retriever = self.judge_server = self.scorer = self.tracker = None
        self.trainer = self.pool = None

    # ---- 1-2: models, data and the actors of the whole run -----------------------------------------------------
    def setup(self) -> None:
        """Check the settings and the run directory, then 1. models and data, 2. the actors of the whole run."""
        cfg, out = self.cfg, self.out
        if cfg.judge is not None:
            cfg.judge.api_key()  # an unset key variable fails here, before anything starts
        self.fingerprint = fingerprint(cfg)
        self.resume = check_run_directory(out, cfg.run.resume, self.fingerprint)  # refuses another run's directory
        out.mkdir(parents=True, exist_ok=True)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        index, retriever_dir = self._models_and_data()
        self._start_actors(index, retriever_dir)

    def _models_and_data(self) -> tuple[Path, str]:
        """The policy and retriever checkpoints, the questions split, the page index: (index, retriever model)."""
        from vrag_rl.models.tiny import TinyConfig, build_tiny_models
        from vrag_rl.retrieval.corpus_index import ensure_index

        cfg, tiny = self.cfg, None
        if cfg.models.policy is None or cfg.models.retriever is None:
            tiny = build_tiny_models(cfg.models.tiny_dir, TinyConfig(seed=cfg.models.tiny_seed))
        self.policy_dir = cfg.models.policy or str(tiny["policy"])
        retriever_dir = cfg.models.retriever or str(tiny["retriever"])
        self.corpus = Path(cfg.data.corpus)
        self.train_qa, self.val_qa = split_questions(load_qa(self.corpus), cfg)
        if not self.train_qa:
            raise ValueError(f"{self.corpus} has no training questions")
        index = ensure_index(self.corpus, cfg.data.index, retriever_dir)
        log.info("corpus %s: %d training, %d validation questions", self.corpus, len(self.train_qa), len(self.val_qa))
        return index, retriever_dir

    def _start_actors(self, index: Path, retriever_dir: str) -> None:
        """The retriever, the judge server (when the job serves its judge), the reward actor, the tracker."""
        import ray

        from vrag_rl.job.tracking import Tracker
        from vrag_rl.retrieval.actor import start_retriever_actor
        from vrag_rl.retrieval.corpus_index import ensure_dense_index
        from vrag_rl.retrieval.embed import EmbedderConfig
        from vrag_rl.reward.actor import start_reward_actor
        from vrag_rl.reward.judge_server import start_judge_server

        cfg, out = self.cfg, self.out
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        dense = ensure_dense_index(self.corpus, cfg.data.dense_index, cfg.models.dense) if cfg.models.dense else None
        embedder = EmbedderConfig(
            model_dir=retriever_dir, device="cpu", dtype="float32", batch_size=cfg.retriever.embed_batch_size
        )
        self.retriever = start_retriever_actor(str(self.corpus), str(index), embedder, cfg.retriever, dense=dense)
        modes = [str(m) for m in ray.get(self.retriever.modes.remote())]
        if cfg.rollout.agent.search_mode not in modes:  # here, not at the first search inside a rollout worker
            raise ValueError(
                f"rollout.agent.search_mode={cfg.rollout.agent.search_mode} needs an index this corpus lacks; its "
                f"retriever has {modes} (OCR the corpus for text, set models.dense for dense)"
            )
        log.info("retriever modes: %s", ", ".join(modes))
        judge, judge_key = cfg.judge, None
        if judge is not None and judge.model_dir:  # a judge the job serves itself, behind a key the job made
            self.judge_server, judge, judge_key = start_judge_server(judge, out / "judge_server.log")
        self.scorer = start_reward_actor(cfg.reward, judge, judge_key=judge_key)
        self.state = json.loads((self.resume / "controller.json").read_text()) if self.resume else {"step": 0}
        config = json.loads(json.dumps(asdict(cfg), default=str))
        self.tracker = Tracker(out, cfg.tracking, config=config, resume_step=self.state["step"])

    # ---- 3-5: warm start, GRPO steps, export -------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """The SFT warm start, the GRPO steps and the export; returns the last step's metrics."""
        from vrag_rl.job.sft import warm_start
        from vrag_rl.job.tracking import read_metrics
        from vrag_rl.learner.ranks import TrainerGroup
        from vrag_rl.rollout.worker import RolloutPool

        cfg, out = self.cfg, self.out
        start_dir = warm_start(cfg, self.policy_dir, self.corpus, self.train_qa, out, self.fingerprint)
        self.pool = RolloutPool(replace(cfg.rollout, model_dir=start_dir), self.retriever, str(self.corpus))
        self.trainer = TrainerGroup(cfg.trainer, start_dir, objective(cfg), cfg.run.steps)  # while engines start
        self.pool.ready()
        grpo_qa = self.train_qa[: cfg.data.max_grpo_questions]
        sampler = EpochSampler(len(grpo_qa), cfg.seed)
        step = 0
        if self.resume is not None:
            self.trainer.load(self.resume / "trainer")
            step = self.state["step"]
            sampler.restore(self.state["sampler"])
            sync_weights(self.trainer, self.pool, cfg.rollout.bucket_bytes, version=step)
            log.info("resumed from %s (step %d)", self.resume, step)
        batches = Lookahead(self.pool, grpo_qa, sampler, cfg, barrier=self._saves, resync=self._resync)
        ledger = Ledger(out / "ledger.jsonl", step)
        # A resume with no step left (killed after the last save) still reports the last step's metrics.
        last = (
            {k: v for k, v in (read_metrics(out / "metrics.jsonl") or [{}])[-1].items() if k != "step"} if step else {}
        )
        guard = SkipGuard(cfg.run.max_consecutive_skips)
        bar = progress_bar(total=cfg.run.steps, initial=step, desc="grpo", unit="step")
        while step < cfg.run.steps:
            step += 1
            batch = batches.take(step)
            result = grpo_step(batch, self.pool, self.scorer, self.trainer, cfg)
            ledger.record(batch)
            check_judge(result.rewards, cfg, f"GRPO step {step}")
            for k, skipped in enumerate(result.skipped):
                guard.record(skipped, f"GRPO step {step}, update {k + 1}")
            last = result.metrics
            if self.val_qa and cfg.run.val_every and (step % cfg.run.val_every == 0 or step == cfg.run.steps):
                last |= validate(self.pool, self.scorer, self.trainer, self.val_qa, cfg, step)
            self.tracker.log(step, last)
            log_step(step, cfg.run.steps, last)
            bar.set_postfix(reward=f"{last['train/reward']:.3f}", ndcg=f"{last['train/ndcg']:.3f}")
            bar.update(1)
            if self._saves(step):
                saved = save_checkpoint(out, step, self.trainer, sampler, cfg.run.keep_checkpoints, self.fingerprint)
                log.info("checkpoint %s", saved)
        bar.close()
        self.trainer.export(out / "export", cfg.run.export_dtype)
        log.info("exported the policy to %s (transformers and vLLM load it)", out / "export")
        return last

    def _saves(self, step: int) -> bool:
        """Whether ``step`` ends with a checkpoint."""
        run = self.cfg.run
        return step == run.steps or bool(run.save_every and step % run.save_every == 0)

    def _resync(self, version: int) -> None:
        """The trainer's weights (``version``) into rollout workers that were restarted with their initial ones."""
        sync_weights(self.trainer, self.pool, self.cfg.rollout.bucket_bytes, version)

    def cleanup(self) -> None:
        """Stop everything setup and train started, newest first; one failure does not keep the rest running."""
        import ray

        stops = [
            ("tracker", lambda t: t.close()),
            ("pool", lambda p: p.shutdown()),
            ("trainer", lambda t: t.shutdown()),
            ("retriever", ray.kill),
            ("scorer", lambda s: s.shutdown()),
            ("judge_server", lambda j: (ray.get(j.stop.remote()), ray.kill(j))),
        ]
        for name, stop in stops:
            thing = getattr(self, name)
            setattr(self, name, None)  # a second cleanup finds nothing to stop
            if thing is None:
                continue
            try:
                stop(thing)
            except Exception:  # noqa: BLE001 (the others are still stopped; the run's own error goes on)
                log.exception("stopping the %s failed", name)


def run(cfg: TrainConfig, out: Path) -> dict:
    """The whole job (see the module docstring); returns its summary, also written to ``OUT/summary.json``."""
    t_start = time.perf_counter()
    job = GrpoJob(cfg, out)
    try:
        job.setup()
        last = job.train()
    finally:
        job.cleanup()
    summary = {
        "steps": cfg.run.steps,
        "final": last,
        "seconds": time.perf_counter() - t_start,
        "export": str(out / "export"),
        "out_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
