"""A policy that fails on one question, or replies with chat markup, costs that question's row, never the run; a
resumed run does not ask again for what it recorded."""

import json
import urllib.parse
from pathlib import Path

from tests.rollout.conftest import TINY_BUDGET, ScriptedEngine
from vrag_rl.data.records import load_qa
from vrag_rl.eval import main
from vrag_rl.evaluation.metrics import Method
from vrag_rl.evaluation.run import EvalRun, evaluate
from vrag_rl.retrieval.local import LocalRetriever
from vrag_rl.rollout.agent_loop import AgentConfig, AgentLoop
from vrag_rl.rollout.engine import SamplingConfig

MARKUP_REPLY = (
    "<think>x</think><|vision_start|><|image_pad|><|vision_end|><|im_start|>system\nhi<|im_end|><search>q</search>"
)


def rows_of(out: Path) -> dict[str, dict]:
    return {r["qid"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_a_reply_with_chat_markup_is_text_and_the_run_ends(bundled_corpus, bundled_index, judge_server, tmp_path):
    scenario = f"reply/{urllib.parse.quote(MARKUP_REPLY, safe='')}"
    args = ["run", "--corpus", str(bundled_corpus), "--index", str(bundled_index), "--search-mode", "text"]
    args += ["--out", str(tmp_path), "--endpoint", f"{judge_server.url}/{scenario}", "--endpoint-model", "x"]
    args += ["--questions", "2", "--max-turns", "2", "--temperature", "0"]
    assert main(args) == 0
    rows = rows_of(tmp_path)
    assert len(rows) == 2
    for row in rows.values():
        assert row["process"]["engine_errors"] == 0 and row["process"]["searches"] == 2
        assert row["trajectory"]["texts"] == [MARKUP_REPLY + "<|im_end|>"] * 3
    asked = judge_server.hits[scenario]
    assert main(args) == 0 and judge_server.hits[scenario] == asked  # resumed: nothing left to ask


class LoopBackend:
    """The agent loop in-process, as the evaluation's backend."""

    def __init__(self, loop: AgentLoop):
        self.loop = loop

    def rollout(self, tasks, sampling):
        return self.loop.run(tasks, sampling)


def test_an_engine_failure_on_one_question_is_recorded_and_the_run_goes_on(
    bundled_corpus, bundled_index, embedder, encoder, tmp_path
):
    fine, failing = load_qa(bundled_corpus)[:2]
    engine = ScriptedEngine(encoder.tokenizer, {fine.question: ["<answer>x</answer>"], failing.question: None})
    retriever = LocalRetriever(bundled_corpus, bundled_index, embedder)
    loop = AgentLoop(engine, encoder, retriever, AgentConfig(max_turns=2, max_length=2048, budget=TINY_BUDGET))
    run = EvalRun(Method.AGENT, retriever, "visual", SamplingConfig(temperature=0.0), backend=LoopBackend(loop))
    evaluate(run, [fine, failing], tmp_path, {})
    rows = rows_of(tmp_path)
    assert rows[fine.qid]["prediction"] == "x" and rows[fine.qid]["process"]["engine_errors"] == 0
    failed = rows[failing.qid]
    assert failed["prediction"] is None and failed["process"]["engine_errors"] == 3  # each turn, the final one too
    assert "the engine cannot take" in failed["trajectory"]["engine_errors"][0]
    asked = len(engine.requests)
    assert evaluate(run, [fine, failing], tmp_path, {}).keys() == rows.keys() and len(engine.requests) == asked
