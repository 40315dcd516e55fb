"""Watch the agent act: ``python -m vrag_rl.rollout``.

Runs the multi-turn agent on a few questions of a corpus against its page index and writes readable
transcripts (``index.html``: every turn's thinking and action, the pages and crops the model was shown, the
crop boxes drawn on the image they refer to) plus ``trajectories.jsonl`` with rewards. The first thing to run
to see what a policy does.

Defaults need nothing but this repository: the bundled synthetic corpus, the tiny ColQwen2 retriever
(its index is built into the cache on first use) and the tiny policy after its supervised warm start
(``vrag_rl.models.warm``), on the vLLM engine. Point ``--policy`` at any exported checkpoint to watch it
instead, ``--engine hf`` to use transformers.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

from vrag_rl.agent.images import ImageBudget
from vrag_rl.config import BUNDLED_CORPUS
from vrag_rl.data.records import load_qa
from vrag_rl.reward.actor import RewardScorer, rollout_summary
from vrag_rl.reward.score import RewardConfig
from vrag_rl.rollout.agent_loop import AgentConfig, make_groups
from vrag_rl.rollout.engine import SamplingConfig
from vrag_rl.rollout.transcript import write_transcripts
from vrag_rl.rollout.vllm_engine import VLLMConfig
from vrag_rl.rollout.worker import RolloutConfig, RolloutWorker

log = logging.getLogger("vrag_rl.rollout")
CACHE = Path(os.environ.get("VRAG_RL_CACHE", ".cache"))
# The tiny policy's processor takes images of 4..512 merged patches; pages are shown small.
TINY_BUDGET = ImageBudget(min_pixels=64 * 28 * 28, max_pixels=256 * 28 * 28)


def open_retriever(corpus: Path, index: Path | None, retriever_model: str):
    """The corpus's retriever; the default index in the cache is (re)built when missing or stale."""
    from vrag_rl.retrieval.embed import EmbedderConfig, PageEmbedder
    from vrag_rl.retrieval.index import IndexConfig, MultiVectorIndex
    from vrag_rl.retrieval.service import Retriever
    from vrag_rl.retrieval.store import StaleIndexError

    embedder = PageEmbedder(EmbedderConfig(model_dir=retriever_model, device="cpu", dtype="float32"))
    if index is not None:
        return Retriever(corpus, index, embedder)  # a user's index is never rebuilt behind their back
    index = CACHE / "index" / corpus.resolve().name
    try:
        return Retriever(corpus, index, embedder)
    except (FileNotFoundError, StaleIndexError) as err:
        log.info("building the page index in %s (%s)", index, type(err).__name__)
    shutil.rmtree(index, ignore_errors=True)
    MultiVectorIndex.build(index, corpus, embedder, IndexConfig(dtype="float32", approx="none"))
    return Retriever(corpus, index, embedder)


def ensure_index(corpus: Path, index: Path | None, retriever_model: str) -> Path:
    """``index`` as given, or the cache's index of the corpus, (re)built when missing or stale."""
    if index is not None:
        return index
    open_retriever(corpus, None, retriever_model)
    return CACHE / "index" / corpus.resolve().name


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m vrag_rl.rollout", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=Path(BUNDLED_CORPUS), help="page corpus with qa.parquet")
    p.add_argument("--index", type=Path, default=None, help="its page index (default: built into the cache)")
    p.add_argument("--policy", default=None, help="policy checkpoint directory (default: the warm tiny policy)")
    p.add_argument("--retriever-model", default=None, help="ColQwen2 directory (default: the tiny one)")
    p.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--samples", type=int, default=1, help="trajectories per question")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-turn-tokens", type=int, default=256)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--min-pixels", type=int, default=TINY_BUDGET.min_pixels)
    p.add_argument("--max-pixels", type=int, default=TINY_BUDGET.max_pixels)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/watch-TIME)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if a.policy is None or a.retriever_model is None:
        from vrag_rl.models.tiny import TinyConfig, build_tiny_models
        from vrag_rl.models.warm import build_warm_policy

        tiny = build_tiny_models(CACHE / "tiny", TinyConfig(seed=0))
        a.retriever_model = a.retriever_model or str(tiny["retriever"])
        a.policy = a.policy or str(build_warm_policy(tiny["policy"], BUNDLED_CORPUS, CACHE / "warm"))
    records = load_qa(a.corpus)[: a.questions]
    if not records:
        raise SystemExit(f"{a.corpus} has no questions (qa.parquet)")
    retriever = open_retriever(a.corpus, a.index, a.retriever_model)
    agent = AgentConfig(
        max_turns=a.max_turns,
        max_length=a.max_length,
        budget=ImageBudget(min_pixels=a.min_pixels, max_pixels=a.max_pixels),
    )
    vllm = VLLMConfig(
        dtype="float32",
        max_model_len=a.max_length,
        max_images=a.max_turns,
        kv_cache_memory_bytes=256 << 20,
        enforce_eager=True,
    )
    cfg = RolloutConfig(engine=a.engine, model_dir=a.policy, dtype="float32", vllm=vllm, agent=agent)
    worker = RolloutWorker(cfg, retriever=retriever)
    tasks = make_groups([(r.qid, r.question) for r in records], a.samples, a.seed)
    t0 = time.perf_counter()
    rollouts = worker.rollout(tasks, SamplingConfig(temperature=a.temperature, max_tokens=a.max_turn_tokens))
    elapsed = time.perf_counter() - t0
    by_qid = {r.qid: r for r in records}
    rewards = RewardScorer(RewardConfig()).score([(by_qid[r.task.qid], rollout_summary(r)) for r in rollouts])
    extras = [
        {
            "reference": by_qid[r.task.qid].answer,
            "gold_pages": by_qid[r.task.qid].gold_pages,
            "reward": {k: b[k] for k in ("total", "ndcg", "answer", "format")},
        }
        for r, b in zip(rollouts, rewards)
    ]
    out = a.out or Path("runs") / time.strftime("watch-%Y%m%d-%H%M%S")
    page = write_transcripts(rollouts, extras, worker.encoder.tokenizer, worker.encoder.image_token_id, out)
    worker.close()
    for r, b in zip(rollouts, rewards):
        actions = " → ".join(x.kind for x in r.actions)
        print(f"{r.task.qid} #{r.task.sample}: {actions} | answer={r.answer!r} | reward {b['total']:.2f}")
    print(f"{len(rollouts)} trajectories in {elapsed:.1f}s; transcripts: {page}")
    return page
