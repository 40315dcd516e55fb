"""Watch the agent act: ``python -m vrag_rl.watch``.

Runs the multi-turn agent on a few questions of a corpus against its page index and writes readable
transcripts (``index.html``: every turn's thinking and action, the pages and crops the model was shown, the
crop boxes drawn on the image they refer to) plus ``trajectories.jsonl`` with rewards. The first thing to run
to see what a policy does.

Defaults need nothing but this repository: the bundled synthetic corpus, the tiny ColQwen2 retriever
(its index is built into the cache on first use) and the tiny policy after its supervised warm start
(``vrag_rl.job.warm``), on the vLLM engine. Point ``--policy`` at any exported checkpoint to watch it
instead, ``--engine hf`` to use transformers.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from vrag_rl.cli import (
    add_agent_args,
    add_corpus_args,
    add_policy_args,
    dense_config,
    fill_defaults,
    rollout_config,
)
from vrag_rl.data.records import load_pages, load_qa, page_label
from vrag_rl.retrieval.corpus_index import open_retriever
from vrag_rl.reward.actor import RewardScorer
from vrag_rl.reward.score import RewardConfig
from vrag_rl.rollout.engine import SamplingConfig
from vrag_rl.rollout.records import make_groups
from vrag_rl.rollout.scoring import score_rollouts
from vrag_rl.rollout.transcript import write_transcripts
from vrag_rl.rollout.worker import RolloutWorker


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m vrag_rl.watch", description=__doc__.split("\n\n")[0])
    add_corpus_args(p)
    add_policy_args(p, endpoint=False)
    add_agent_args(p)
    p.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--samples", type=int, default=1, help="trajectories per question")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/watch-TIME)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    fill_defaults(a)
    records = load_qa(a.corpus)[: a.questions]
    if not records:
        raise SystemExit(f"{a.corpus} has no questions (qa.parquet)")
    retriever = open_retriever(a.corpus, a.index, a.retriever_model, dense_config(a))
    cfg = rollout_config(a, max_images=a.max_turns, engine=a.engine)
    worker = RolloutWorker(cfg, retriever=retriever)
    tasks = make_groups([(r.qid, r.question) for r in records], a.samples, a.seed)
    t0 = time.perf_counter()
    rollouts = worker.rollout(tasks, SamplingConfig(temperature=a.temperature, max_tokens=a.max_turn_tokens))
    elapsed = time.perf_counter() - t0
    by_qid = {r.qid: r for r in records}
    times = {p.page_id: p.timestamp for p in load_pages(a.corpus)}
    rewards = score_rollouts(RewardScorer(RewardConfig()), by_qid, rollouts)
    extras = [
        {
            "reference": by_qid[r.task.qid].answer,
            "gold_pages": by_qid[r.task.qid].gold_pages,
            "retrieved_labels": [page_label(p, times[p]) for p in r.retrieved_pages],  # video frames: with times
            "reward": {"total": b.total, "ndcg": b.ndcg, "answer": b.answer, "format": b.format},
        }
        for r, b in zip(rollouts, rewards)
    ]
    out = a.out or Path("runs") / time.strftime("watch-%Y%m%d-%H%M%S")
    page = write_transcripts(rollouts, extras, worker.encoder.tokenizer, worker.encoder.image_token_id, out)
    worker.close()
    for r, b in zip(rollouts, rewards):
        actions = " → ".join(x.kind for x in r.actions)
        print(f"{r.task.qid} #{r.task.sample}: {actions} | answer={r.answer!r} | reward {b.total:.2f}")
    print(f"{len(rollouts)} trajectories in {elapsed:.1f}s; transcripts: {page}")
    return page


if __name__ == "__main__":
    main()
