"""Serving benchmark: questions per second and latency of the agent API at 1, 4 and 16 concurrent clients.

    python bench/serve.py                 # 32 questions per level, about 3 minutes on 2 cores
    python bench/serve.py --requests 64
    python bench/serve.py --against REV   # also the server of an earlier commit, batched, in the same run

The same server (``python -m vrag_rl.serve``, the warm tiny policy on a local vLLM engine, the bundled corpus)
runs twice: with concurrent sessions batched together (``--max-live 16``), and serving them one at a time
(``--max-live 1``, the others waiting). ``--against REV`` adds a third, batched run of the server as commit REV has
it (from a temporary git worktree). At each level, that many clients on 127.0.0.1 send the first ``--requests``
questions of the corpus between them, one after another each, non-streaming. q/s is requests over the wall time of
the level; latency is each request's own, arrival to answer (queueing included). Each server answers one question
before timing starts. Results go to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import quantiles

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vrag_rl  # noqa: E402,F401  (torchvision shim first)
from bench.machine import machine  # noqa: E402
from vrag_rl.data.paths import BUNDLED_CORPUS, cache_dir  # noqa: E402
from vrag_rl.data.records import load_qa  # noqa: E402
from vrag_rl.job.warm import build_warm_policy  # noqa: E402
from vrag_rl.models.tiny import TinyConfig, build_tiny_models  # noqa: E402
from vrag_rl.vllm_server import ServerProcess, free_port  # noqa: E402

LEVELS = (1, 4, 16)


def start(policy: Path, retriever: Path, max_live: int, log: Path, tree: Path = ROOT) -> ServerProcess:
    """The server of the source tree ``tree``: first on PYTHONPATH, since the environment's startup hook imports the
    package before the working directory is searched."""
    port = free_port("127.0.0.1")
    cmd = [sys.executable, "-m", "vrag_rl.serve", "--port", str(port), "--policy", str(policy)]
    cmd += ["--retriever-model", str(retriever), "--max-live", str(max_live), "--max-waiting", "64"]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    return ServerProcess(
        cmd, url, log, env=env, cwd=tree, ready_path="/ready", start_timeout_s=600, name="vrag_rl.serve"
    )


def mean_batch(before: dict, after: dict) -> float:
    """Session turns per engine step, from ``/ready``'s counters (a server whose sessions stepped turn by turn
    counted one step per batched turn)."""
    if "engine_steps" in after:
        steps, turns = (
            after["engine_steps"] - before["engine_steps"],
            after["engine_batched"] - before["engine_batched"],
        )
    else:
        steps, turns = after["steps"] - before["steps"], after["session_turns"] - before["session_turns"]
    return turns / max(1, steps)


def ask(url: str, question: str) -> float:
    t0 = time.perf_counter()
    body = {"model": "vrag-agent", "messages": [{"role": "user", "content": question}]}
    reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    reply.raise_for_status()
    return time.perf_counter() - t0


def level(url: str, questions: list[str], clients: int) -> dict:
    before = httpx.get(url + "/ready").json()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(lambda q: ask(url, q), questions))
    wall = time.perf_counter() - t0
    after = httpx.get(url + "/ready").json()
    cuts = quantiles(latencies, n=20, method="inclusive")
    return {
        "questions_per_s": len(questions) / wall,
        "p50_s": cuts[9],
        "p95_s": cuts[18],
        "mean_batch": mean_batch(before, after),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("serve-results.json"))
    p.add_argument("--against", help="a git revision whose server also runs, batched")
    args = p.parse_args()
    tiny = build_tiny_models(cache_dir() / "tiny", TinyConfig(seed=0))
    policy = build_warm_policy(tiny["policy"], BUNDLED_CORPUS, cache_dir() / "warm")
    records = load_qa(BUNDLED_CORPUS)
    questions = [records[i % len(records)].question for i in range(args.requests)]
    results: dict[str, dict] = {}
    runs = [("batched (max-live 16)", 16, ROOT), ("one at a time (max-live 1)", 1, ROOT)]
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            tree = Path(tmp) / "against"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.against], check=True)
            runs.append((f"{args.against} batched (max-live 16)", 16, tree))
        try:
            for name, max_live, root in runs:
                server = start(policy, tiny["retriever"], max_live, Path(tmp) / f"{len(results)}.log", root)
                try:
                    ask(server.url, questions[0])
                    results[name] = {str(c): level(server.url, questions, c) for c in LEVELS}
                finally:
                    server.stop()
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    report(results)
    out = {"machine": machine(), "settings": {**vars(args), "out": str(args.out)}, "results": results}
    args.out.write_text(json.dumps(out, indent=1))


def report(results: dict[str, dict]) -> None:
    width = max(len(name) for name in results)
    print(f"{'':{width}} {'clients':>7} {'q/s':>7} {'p50 s':>7} {'p95 s':>7} {'batch':>6}")
    for name, by_level in results.items():
        for c, r in by_level.items():
            row = f"{r['questions_per_s']:7.2f} {r['p50_s']:7.2f} {r['p95_s']:7.2f} {r['mean_batch']:6.2f}"
            print(f"{name:{width}} {c:>7} {row}")
    batched = results["batched (max-live 16)"]
    for other in (name for name in results if name != "batched (max-live 16)"):
        for c in map(str, LEVELS):
            ratio = batched[c]["questions_per_s"] / results[other][c]["questions_per_s"]
            print(f"{c} clients: batched / {other} = {ratio:.2f}x")


if __name__ == "__main__":
    main()
