"""Rollout benchmark: multi-turn agent trajectories per second with the vLLM and the transformers engine.

    python bench/rollout.py                    # 16 questions x 4 samples, both engines
    python bench/rollout.py --questions 8 --engines vllm

The tiny policy after its supervised warm start (it searches, crops and answers) runs the full agent loop
(DESIGN §3: batched generation across trajectories each turn, batched search, crops, feedback turns) over
the bundled corpus and its real ColQwen2 page index, with both engines in one run on the same tasks and the
same sampling settings (temperature 1, per-trajectory seeds). Each engine first runs one warm-up batch.
Reported per engine: trajectories/s, turns and generated tokens, and the share of wall time spent in
generation, in retrieval, and elsewhere (the agent's own work: parsing, cropping, resizing, image encoding
for the record, bookkeeping) -- the agent overhead, target <= 10%. Results go to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vrag_rl  # noqa: E402,F401  (torchvision shim first)
from bench.machine import machine  # noqa: E402
from vrag_rl.data.paths import BUNDLED_CORPUS, cache_dir  # noqa: E402
from vrag_rl.data.records import load_qa  # noqa: E402
from vrag_rl.job.warm import build_warm_policy  # noqa: E402
from vrag_rl.models.tiny import TINY_BUDGET, TinyConfig, build_tiny_models  # noqa: E402
from vrag_rl.retrieval.corpus_index import open_retriever  # noqa: E402
from vrag_rl.rollout.agent_loop import AgentConfig, make_groups  # noqa: E402
from vrag_rl.rollout.engine import SamplingConfig  # noqa: E402
from vrag_rl.rollout.vllm_engine import VLLMConfig  # noqa: E402
from vrag_rl.rollout.worker import RolloutConfig, RolloutWorker  # noqa: E402


def run_engine(name: str, policy: str, retriever, tasks, warmup, sampling: SamplingConfig, args) -> dict:
    agent = AgentConfig(max_turns=args.max_turns, max_length=args.max_length, budget=TINY_BUDGET)
    vllm = VLLMConfig(
        dtype="float32",
        max_model_len=args.max_length,
        max_images=args.max_turns,
        kv_cache_memory_bytes=512 << 20,
        enforce_eager=True,
    )
    worker = RolloutWorker(
        RolloutConfig(engine=name, model_dir=policy, dtype="float32", vllm=vllm, agent=agent), retriever=retriever
    )
    worker.rollout(warmup, sampling)
    t0 = time.perf_counter()
    rollouts = worker.rollout(tasks, sampling)
    wall = time.perf_counter() - t0
    t = worker.timings()
    worker.close()
    generated = sum(sum(r.trajectory.response_mask) for r in rollouts)
    kinds = [a.kind for r in rollouts for a in r.actions]
    return {
        "engine": name,
        "trajectories": len(rollouts),
        "wall_s": wall,
        "trajectories_per_s": len(rollouts) / wall,
        "generated_tokens_per_s": generated / wall,
        "mean_turns": sum(r.num_turns for r in rollouts) / len(rollouts),
        "mean_tokens": sum(len(r.trajectory) for r in rollouts) / len(rollouts),
        "actions": {k: kinds.count(k) for k in ("search", "bbox", "answer", "invalid")},
        "finished": sum(r.finished for r in rollouts) / len(rollouts),
        "generate_share": t["generate_s"] / t["total_s"],
        "search_share": t["search_s"] / t["total_s"],
        "overhead_share": 1 - (t["generate_s"] + t["search_s"]) / t["total_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-turn-tokens", type=int, default=128)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--engines", default="vllm,hf")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("rollout-results.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tiny = build_tiny_models(cache_dir() / "tiny", TinyConfig(seed=0))
    policy = str(build_warm_policy(tiny["policy"], BUNDLED_CORPUS, cache_dir() / "warm"))
    retriever = open_retriever(BUNDLED_CORPUS, None, str(tiny["retriever"]))
    qa = load_qa(BUNDLED_CORPUS)
    tasks = make_groups([(r.qid, r.question) for r in qa[: args.questions]], args.samples, seed=0)
    warmup = make_groups([(r.qid, r.question) for r in qa[-2:]], 2, seed=1)
    sampling = SamplingConfig(temperature=1.0, max_tokens=args.max_turn_tokens)
    results = [run_engine(e, policy, retriever, tasks, warmup, sampling, args) for e in args.engines.split(",")]
    report = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)}, "results": results}
    print(f"\n{len(tasks)} trajectories ({args.questions} questions x {args.samples}), max {args.max_turns} turns")
    print("| engine | traj/s | gen tok/s | turns | tokens | finished | generate | search | agent overhead |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['engine']} | {r['trajectories_per_s']:.2f} | {r['generated_tokens_per_s']:.0f} | "
            f"{r['mean_turns']:.2f} | {r['mean_tokens']:.0f} | {r['finished']:.0%} | {r['generate_share']:.1%} | "
            f"{r['search_share']:.1%} | {r['overhead_share']:.1%} |"
        )
    if len(results) == 2:
        print(
            f"speed-up {results[0]['engine']} / {results[1]['engine']}: "
            f"{results[0]['trajectories_per_s'] / results[1]['trajectories_per_s']:.2f}x"
        )
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
