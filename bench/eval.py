"""Evaluation benchmark: questions per second of the agent method, side by side in one run.

    python bench/eval.py                  # the bundled corpus's 60 questions
    python bench/eval.py --questions 32

Three ways to answer the same questions with the warm tiny policy, greedy, search mode text, all questions
in one batch (``--chunk``): one in-process vLLM engine; two engines as Ray actors (``--engines 2``); and the
endpoint path, against a vLLM OpenAI-compatible server this script starts on 127.0.0.1 with the same
policy (its start is not timed). Each is a ``python -m vrag_rl.eval run`` process; the number is the report's
``questions_per_s``: the questions over the seconds spent answering them, start-up excluded. Results go
to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vrag_rl  # noqa: E402,F401  (torchvision shim first)
from bench.machine import machine  # noqa: E402
from vrag_rl.data.paths import BUNDLED_CORPUS, cache_dir  # noqa: E402
from vrag_rl.job.warm import build_warm_policy  # noqa: E402
from vrag_rl.models.tiny import TinyConfig, build_tiny_models  # noqa: E402
from vrag_rl.vllm_server import VLLMServer  # noqa: E402


def evaluate(name: str, extra: list[str], args, work: Path) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "vrag_rl.eval", "run", "--search-mode", "text", "--questions", str(args.questions)]
    cmd += ["--chunk", str(args.chunk), "--out", str(out), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    process = json.loads((out / "report.json").read_text())["process"]
    return {
        "questions_per_s": process["questions_per_s"],
        "answer_seconds": process["seconds"],
        "process_seconds": time.perf_counter() - t0,
        "finish_rate": process["finish_rate"],
        "turns": process["turns"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=60)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("eval-results.json"))
    args = p.parse_args()
    tiny = build_tiny_models(cache_dir() / "tiny", TinyConfig(seed=0))
    policy = build_warm_policy(tiny["policy"], BUNDLED_CORPUS, cache_dir() / "warm")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["1 engine (in-process)"] = evaluate("one", ["--policy", str(policy)], args, work)
        results["2 engines (Ray actors)"] = evaluate("two", ["--policy", str(policy), "--engines", "2"], args, work)
        server = VLLMServer(policy, "tiny", work / "server.log", extra_args=["--limit-mm-per-prompt", '{"image": 8}'])
        try:
            endpoint = ["--endpoint", server.base_url(), "--endpoint-model", "tiny", "--processor", str(policy)]
            results["endpoint (vLLM server)"] = evaluate("endpoint", endpoint, args, work)
        finally:
            server.stop()
    base = results["1 engine (in-process)"]["questions_per_s"]
    print(f"{'':26} {'q/s':>7} {'ratio':>7} {'answering s':>12} {'process s':>10} {'finish':>7}")
    for name, r in results.items():
        print(
            f"{name:26} {r['questions_per_s']:7.2f} {r['questions_per_s'] / base:6.2f}x {r['answer_seconds']:12.1f} "
            f"{r['process_seconds']:10.1f} {r['finish_rate']:7.2f}"
        )
    report = {"machine": machine(), "settings": {**vars(args), "out": str(args.out)}, "results": results}
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
