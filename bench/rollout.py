"""Rollout benchmark: multi-turn agent trajectories per second, per engine and per agent loop.

    python bench/rollout.py                    # 16 questions x 4 samples, both engines, per-trajectory loop
    python bench/rollout.py --questions 8 --engines vllm
    python bench/rollout.py --engines vllm --loops trajectories,turns --max-turn-tokens 512   # the two loops
    python bench/rollout.py --engines vllm --loops trajectories,turns --max-turn-tokens 512 --long-every 8

The tiny policy after its supervised warm start (it searches, crops and answers) runs the full agent loop
(DESIGN §3: batched generation across trajectories each turn, batched search, crops, feedback turns) over
the bundled corpus and its real ColQwen2 page index, with both engines in one run on the same tasks and the
same sampling settings (temperature 1, per-trajectory seeds). Each engine first runs one warm-up batch.
Reported per engine and loop: trajectories/s, turns and generated tokens, the turn lengths' median, 95th
percentile and maximum (``--long-every N`` makes one turn in N run at least ``--long-tokens``: a long tail), and
the share of wall time the engine was generating. The turn-synchronous loop also reports the share in retrieval and
elsewhere (the agent's own work: parsing, cropping, resizing, image encoding for the record, bookkeeping) --
the agent overhead, target <= 10%; in the per-trajectory loop these overlap generation. Results go to stdout
and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vrag_rl  # noqa: E402,F401  (torchvision shim first)
from bench.machine import machine  # noqa: E402
from vrag_rl.agent.chat import ChatEncoder  # noqa: E402
from vrag_rl.data.paths import BUNDLED_CORPUS, cache_dir  # noqa: E402
from vrag_rl.data.records import load_qa  # noqa: E402
from vrag_rl.job.warm import build_warm_policy  # noqa: E402
from vrag_rl.models.tiny import TINY_BUDGET, TinyConfig, build_tiny_models  # noqa: E402
from vrag_rl.retrieval.corpus_index import open_retriever  # noqa: E402
from vrag_rl.rollout.agent_loop import AgentConfig, AgentLoop  # noqa: E402
from vrag_rl.rollout.engine import SamplingConfig  # noqa: E402
from vrag_rl.rollout.records import make_groups  # noqa: E402
from vrag_rl.rollout.vllm_engine import VLLMConfig, VLLMEngine  # noqa: E402
from vrag_rl.rollout.worker import RolloutConfig, make_engine  # noqa: E402


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def measure(loop: AgentLoop, tasks, warmup, sampling: SamplingConfig) -> dict:
    """One warm-up batch, then the tasks, timed."""
    loop.run(warmup, sampling)
    t0 = time.perf_counter()
    rollouts = loop.run(tasks, sampling)
    wall = time.perf_counter() - t0
    t = loop.timings
    generated = sum(sum(r.trajectory.response_mask) for r in rollouts)
    kinds = [a.kind for r in rollouts for a in r.actions]
    turns = [n for r in rollouts for n in r.trajectory.turn_lengths]
    return {
        "trajectories": len(rollouts),
        "wall_s": wall,
        "trajectories_per_s": len(rollouts) / wall,
        "generated_tokens_per_s": generated / wall,
        "mean_turns": sum(r.num_turns for r in rollouts) / len(rollouts),
        "mean_tokens": sum(len(r.trajectory) for r in rollouts) / len(rollouts),
        "actions": {k: kinds.count(k) for k in ("search", "bbox", "answer", "invalid")},
        "finished": sum(r.finished for r in rollouts) / len(rollouts),
        "turn_tokens_p50_p95_max": [percentile(turns, 0.5), percentile(turns, 0.95), float(max(turns))],
        "generate_share": t["generate_s"] / t["total_s"],
        "search_share": t["search_s"] / t["total_s"],
        "overhead_share": 1 - (t["generate_s"] + t["search_s"]) / t["total_s"],
        "texts": [r.texts for r in rollouts],
    }


class LongTailVLLM(VLLMEngine):
    """vLLM where one turn in ``every`` (by its sampling seed) must run at least ``tokens`` tokens (vLLM's
    ``min_tokens``): a few turns many times longer than the rest, as real agents' turns are."""

    every, tokens = 0, 0

    def _params(self, r, sampling):
        params = super()._params(r, sampling)
        if self.every and r.seed is not None and r.seed % self.every == 0:
            params.min_tokens = min(self.tokens, params.max_tokens)
        return params


def run_engine(name: str, loops: list[str], policy: str, retriever, tasks, warmup, sampling, args) -> list[dict]:
    """Each loop in turn on one worker (one engine start), the same tasks and seeds."""
    agent = AgentConfig(max_turns=args.max_turns, max_length=args.max_length, budget=TINY_BUDGET)
    vllm = VLLMConfig(
        dtype="float32",
        max_model_len=args.max_length,
        max_images=args.max_turns,
        kv_cache_memory_bytes=512 << 20,
        enforce_eager=True,
    )
    cfg = RolloutConfig(engine=name, model_dir=policy, dtype="float32", vllm=vllm, agent=agent)
    if name == "vllm" and args.long_every:
        LongTailVLLM.every, LongTailVLLM.tokens = args.long_every, args.long_tokens
        engine = LongTailVLLM(policy, vllm)
    else:
        engine = make_engine(cfg)
    from transformers import AutoProcessor

    encoder = ChatEncoder(AutoProcessor.from_pretrained(policy))
    runs: dict[str, list[dict]] = {loop: [] for loop in loops}
    for _ in range(args.repeats):  # the loops alternate, so that a slow spell of the machine hits both
        for loop in loops:
            agent_loop = AgentLoop(engine, encoder, retriever, replace(agent, loop=loop, search_mode=args.search))
            runs[loop].append(measure(agent_loop, tasks, warmup, sampling))
    engine.close()
    # Per loop, its median run by wall time; every run's wall time is kept.
    median = {loop: sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2] for loop, rs in runs.items()}
    return [
        {"engine": name, "loop": loop, "walls_s": [r["wall_s"] for r in runs[loop]]} | median[loop] for loop in loops
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-turn-tokens", type=int, default=128)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--engines", default="vllm,hf")
    p.add_argument("--loops", default="trajectories", help="agent loops to compare: trajectories,turns")
    p.add_argument("--long-every", type=int, default=0, help="vLLM: one turn in N runs at least --long-tokens")
    p.add_argument("--long-tokens", type=int, default=384)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per loop (the median is reported)")
    p.add_argument("--search", default="visual", help="search mode: visual (ColQwen2), text (BM25), hybrid")
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
    loops = args.loops.split(",")
    results = [
        r
        for e in args.engines.split(",")
        for r in run_engine(e, loops, policy, retriever, tasks, warmup, sampling, args)
    ]
    same = [sum(x == y for x, y in zip(a["texts"], b["texts"])) for a, b in zip(results, results[1:])]
    for r in results:
        del r["texts"]
    report = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)}, "results": results}
    print(f"\n{len(tasks)} trajectories ({args.questions} questions x {args.samples}), max {args.max_turns} turns")
    print("| engine | loop | traj/s | gen tok/s | turns | tokens | turn p50/p95/max | engine busy | search | other |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        p50, p95, most = r["turn_tokens_p50_p95_max"]
        print(
            f"| {r['engine']} | {r['loop']} | {r['trajectories_per_s']:.2f} | {r['generated_tokens_per_s']:.0f} | "
            f"{r['mean_turns']:.2f} | {r['mean_tokens']:.0f} | {p50:.0f}/{p95:.0f}/{most:.0f} | "
            f"{r['generate_share']:.1%} | {r['search_share']:.1%} | {r['overhead_share']:.1%} |"
        )
    report["same_turns"] = same
    for (a, b), n in zip(zip(results, results[1:]), same):
        ratio = a["trajectories_per_s"] / b["trajectories_per_s"]
        print(
            f"{a['engine']}/{a['loop']} vs {b['engine']}/{b['loop']}: {ratio:.2f}x trajectories/s; "
            f"{n} of {len(tasks)} trajectories wrote the same turns"
        )
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
