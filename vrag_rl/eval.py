"""Evaluate a policy with the paper's protocol: ``python -m vrag_rl.eval run|report|compare``.

    python -m vrag_rl.eval run --method agent --corpus POOL --policy CHECKPOINT --out OUT
    python -m vrag_rl.eval run --method agent --endpoint http://127.0.0.1:8000/v1 --endpoint-model NAME ...
    python -m vrag_rl.eval run ... --judge-url http://127.0.0.1:8001/v1 --judge-model NAME [--judge-constrain]
    python -m vrag_rl.eval report OUT
    python -m vrag_rl.eval compare OUT_A OUT_B
    python -m vrag_rl.eval sft-data OUT --to teacher.jsonl     # then sft.teacher_data=teacher.jsonl

``run`` answers the corpus's questions with one method (``agent``, ``vanilla_rag``, ``direct``,
``retrieval``; ``evaluation.metrics.Method``) through the agent loop of training, on local vLLM engines
(``--engines N``: more than one run as Ray actors) or an OpenAI-compatible endpoint, judges the answers when a
judge is given, and writes ``OUT/results.jsonl`` (one row per question, resumable), ``OUT/report.md``,
``OUT/report.json`` and ``OUT/index.html`` (the questions to browse, with filters). Defaults need nothing but
this repository: the bundled corpus, the tiny ColQwen2 and the warm tiny policy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from vrag_rl.cli import add_agent_args, add_corpus_args, add_policy_args, dense_config, fill_defaults, rollout_config
from vrag_rl.data.records import WriterBusy, load_qa, sha256_file
from vrag_rl.evaluation.browse import write_browser
from vrag_rl.evaluation.metrics import Method
from vrag_rl.evaluation.report import build_report, compare, markdown
from vrag_rl.evaluation.run import RESULTS, SETTINGS, EvalRun, evaluate, read_results
from vrag_rl.evaluation.teacher import KEEP_BY, write_sft_data
from vrag_rl.flat_settings import flatten
from vrag_rl.retrieval.corpus_index import ensure_index, open_retriever
from vrag_rl.reward.judge import JudgeClient, JudgeConfig
from vrag_rl.rollout.engine import SamplingConfig
from vrag_rl.rollout.worker import RolloutPool, RolloutWorker

log = logging.getLogger("vrag_rl.eval")


def run_parser(sub) -> None:
    p = sub.add_parser("run", help="answer and score the questions of a corpus")
    p.add_argument("--method", default=Method.AGENT, choices=list(Method))
    add_corpus_args(p)
    add_policy_args(p)
    add_agent_args(p)
    p.add_argument("--engines", type=int, default=1, help="local vLLM engines; more than 1 run as Ray actors")
    p.add_argument("--engine-cpus", type=float, default=None, help="per engine actor (default: the cores, shared)")
    p.add_argument("--engine-gpus", type=float, default=0.0, help="per engine actor (1 on GPU nodes)")
    p.add_argument("--top-k", type=int, default=3, help="vanilla_rag: pages shown with the question")
    p.add_argument("--questions", type=int, default=None, help="the first N questions (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=16, help="questions per batch (and per flush of the results)")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL of the judge")
    p.add_argument("--judge-model", default=None)
    p.add_argument("--judge-key-env", default=None, help="environment variable holding the judge's key")
    p.add_argument("--judge-constrain", action="store_true", help="ask a vLLM judge for True or False only")
    p.add_argument("--judge-timeout", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=None, help="results directory (default: runs/eval-TIME)")


def judge_of(a) -> JudgeConfig | None:
    if a.judge_url is None:
        return None
    return JudgeConfig(
        base_url=a.judge_url,
        model=a.judge_model or "",
        api_key_env=a.judge_key_env,
        timeout_s=a.judge_timeout,
        constrain_verdict=a.judge_constrain,
    )


def settings_of(a, judge: JudgeConfig | None) -> dict[str, object]:
    """What changes results (``evaluation.run.check_settings``): not the question count, chunking or engines."""
    corpus = a.corpus.resolve()
    settings = {
        "method": str(a.method),
        "policy": a.endpoint_model if a.endpoint else str(a.policy),
        "endpoint": a.endpoint,
        "corpus": str(corpus),
        "data": {name: sha256_file(corpus / name) for name in ("qa.parquet", "pages.parquet")},
        "index": str(a.index),
        "retriever_model": str(a.retriever_model),
        "dense_model": a.dense_model,
        "search_mode": str(a.search_mode),
        "top_k": a.top_k,
        "agent": {k: getattr(a, k) for k in ("max_turns", "max_turn_tokens", "max_length", "crop_padding", "seed")},
        "sampling": {"temperature": a.temperature},
        "budget": {"min_pixels": a.min_pixels, "max_pixels": a.max_pixels},
        "judge": None,
    }
    if judge is not None:
        prompt = hashlib.sha256(judge.prompt_template.encode()).hexdigest()
        settings["judge"] = {"base_url": judge.base_url, "model": judge.model, "prompt_sha256": prompt}
        settings["judge"] |= {"constrain_verdict": judge.constrain_verdict, "temperature": judge.temperature}
    return flatten(settings)


def backend_of(a, retriever, dense):
    """The engine(s) answering: an in-process worker, a Ray pool of ``--engines`` workers, or the endpoint."""
    cfg = rollout_config(a, max_images=max(a.max_turns, a.top_k))
    if a.engines == 1 or a.endpoint:
        return RolloutWorker(cfg, retriever=retriever)
    import ray

    from vrag_rl.retrieval.actor import RetrieverConfig, start_retriever_actor
    from vrag_rl.retrieval.embed import EmbedderConfig

    # The retriever's actors take half a core; the engines share the rest unless told otherwise.
    cfg.num_workers = a.engines
    cfg.num_cpus = a.engine_cpus or min(1.0, max(0.1, ((os.cpu_count() or 1) - 0.5) / a.engines))
    cfg.num_gpus = a.engine_gpus
    log.info("answering with %d local vLLM engines as Ray actors (%.2f CPUs, %g GPUs each)", a.engines, cfg.num_cpus,
             cfg.num_gpus)  # fmt: skip
    ray.init(include_dashboard=False, log_to_driver=False)
    index = ensure_index(a.corpus, a.index, a.retriever_model)
    embedder = EmbedderConfig(model_dir=a.retriever_model, device="cpu", dtype="float32")
    actor = start_retriever_actor(str(a.corpus), str(index), embedder, RetrieverConfig(num_cpus=0.25), dense=dense)
    return RolloutPool(cfg, actor, str(a.corpus)).ready()


def run(a) -> Path:
    method = Method.parse(a.method, "--method")
    generates = method != Method.RETRIEVAL
    fill_defaults(a, needs_policy=generates)
    records = load_qa(a.corpus)[: a.questions]
    if not records:
        raise SystemExit(f"{a.corpus} has no questions (qa.parquet)")
    judge_cfg = judge_of(a)
    settings = settings_of(a, judge_cfg)
    out = a.out or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    dense = dense_config(a)
    retriever = open_retriever(a.corpus, a.index, a.retriever_model, dense)
    backend = backend_of(a, retriever, dense) if generates else None
    judge = None if judge_cfg is None else JudgeClient(judge_cfg)
    sampling = SamplingConfig(temperature=a.temperature, max_tokens=a.max_turn_tokens)
    job = EvalRun(method, retriever, a.search_mode, sampling, backend, judge, a.top_k, a.seed, a.chunk)
    rows = evaluate(job, records, out, settings)
    return write_report(out, [rows[r.qid] for r in records if r.qid in rows])


def write_report(out: Path, rows: list[dict]) -> Path:
    """``report.md``, ``report.json`` and the browsing page ``index.html`` of a results directory."""
    settings = json.loads((out / SETTINGS).read_text())
    report = build_report(rows, settings)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out / "report.md").write_text(markdown(report))
    page = write_browser(rows, Path(settings["corpus"]), out, f"vrag-rl evaluation: {report['method']}, {out.name}")
    print(markdown(report))
    print(f"results: {out / RESULTS}; questions to browse: {page}")
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vrag_rl.eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run_parser(sub)
    sub.add_parser("report", help="rewrite OUT/report.md and report.json from the results").add_argument(
        "out", type=Path
    )
    sft = sub.add_parser("sft-data", help="a teacher run's correct trajectories that saw a gold page, for sft")
    sft.add_argument("out", type=Path, help="the results directory of an agent run")
    sft.add_argument("--to", type=Path, required=True, help="JSON lines file for sft.teacher_data")
    sft.add_argument("--keep-by", choices=KEEP_BY, default="judge", help="what makes an answer correct")
    cmp = sub.add_parser("compare", help="two runs' tables side by side, with per-cell differences")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if a.command == "run":
            run(a)
        elif a.command == "report":
            write_report(a.out, list(read_results(a.out / RESULTS).values()))
        elif a.command == "sft-data":
            tally = write_sft_data(list(read_results(a.out / RESULTS).values()), a.to, a.keep_by)
            left = ", ".join(f"{n} {why}" for why, n in tally.most_common() if why != "kept") or "none"
            print(f"{tally['kept']} trajectories in {a.to}; left out: {left}")
        else:
            reports = [json.loads((d / "report.json").read_text()) for d in (a.a, a.b)]
            print(compare(*reports))
    except (OSError, ValueError, KeyError, WriterBusy) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
