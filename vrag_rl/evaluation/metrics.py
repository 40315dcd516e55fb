"""What one evaluated question scores: the row of ``results.jsonl``.

Every number of the report is computed from these rows (``report.py``) and every row from the functions
here, so a metric has one definition. Answer metrics are the reward's (judge verdict, EM, F1, ANLS), retrieval
metrics the reward's NDCG beside recall and MRR at ``RANK_CUTS``.
"""

from __future__ import annotations

from dataclasses import asdict

from vrag_rl.choice import Choice
from vrag_rl.data.records import QARecord
from vrag_rl.reward.answer import anls, exact_match, token_f1
from vrag_rl.reward.judge import OK, JudgeResult
from vrag_rl.reward.ndcg import reciprocal_rank, retrieval_ndcg, retrieval_recall
from vrag_rl.reward.score import NO_ANSWER
from vrag_rl.rollout.records import Rollout
from vrag_rl.rollout.scoring import process_counts

RULE_METRICS = {"exact_match": exact_match, "f1": token_f1, "anls": anls}
ANSWER_METRICS = ("judge", *RULE_METRICS)
RANK_CUTS = (1, 5, 10)


class Method(Choice):
    AGENT = "agent"  # multi-turn search / crop / answer, as in training
    VANILLA_RAG = "vanilla_rag"  # the question is the query; the top-k pages are shown; one answer turn
    DIRECT = "direct"  # no retrieval: one answer turn
    RETRIEVAL = "retrieval"  # the retriever alone, no generation


GATES = {
    Method.AGENT: "a trajectory without a search or without an answer scores 0 (the reference evaluation's gate)",
    Method.VANILLA_RAG: "an answer is required; the harness searches, so no search is required",
    Method.DIRECT: "an answer is required; there is no retrieval, so no search is required",
    Method.RETRIEVAL: "no generation: retrieval metrics only",
}


def ranking_scores(ranked: list[str], gold: list[str]) -> dict[str, float]:
    """Recall, NDCG and MRR of a ranked list of page ids at every cut of ``RANK_CUTS``."""
    out = {}
    for k in RANK_CUTS:
        out[f"recall@{k}"] = retrieval_recall(ranked, gold, k)
        out[f"ndcg@{k}"] = retrieval_ndcg(ranked, gold, k)
        out[f"mrr@{k}"] = reciprocal_rank(ranked, gold, k)
    return out


def is_gated(method: Method, rollout: Rollout) -> bool:
    if rollout.answer is None:
        return True
    return method == Method.AGENT and rollout.num_searches == 0


def answer_scores(
    rollout: Rollout, record: QARecord, method: Method, verdict: JudgeResult | None, with_judge: bool
) -> tuple[dict[str, float | None], bool]:
    """(every answer metric, gated). A gated trajectory scores 0 everywhere; ``judge`` is None without a judge,
    and 0 where the judge gave no verdict (its status says why)."""
    gated = is_gated(method, rollout)
    scores: dict[str, float | None] = {
        name: 0.0 if gated else fn(rollout.answer, record.answer) for name, fn in RULE_METRICS.items()
    }
    correct = verdict is not None and verdict.status == OK and bool(verdict.correct)
    scores["judge"] = float(correct and not gated) if with_judge else None
    return scores, gated


def trajectory_record(rollout: Rollout) -> dict:
    """The trajectory as text and page ids (what the browsing page and a later look need)."""
    return {
        "texts": rollout.texts,
        "actions": [{"kind": str(a.kind), "content": a.content} for a in rollout.actions],
        "retrieved_pages": rollout.retrieved_pages,
        "crops": [[page, list(box)] for page, box in rollout.crops],
        "views": [[turn, page, None if box is None else list(box)] for turn, page, box in rollout.views],
        "engine_errors": rollout.engine_errors,
    }


def rollout_row(
    rollout: Rollout, record: QARecord, method: Method, verdict: JudgeResult | None, with_judge: bool
) -> dict:
    """The row of one question answered by a trajectory (``verdict``: the judge's, for an answer)."""
    scores, gated = answer_scores(rollout, record, method, verdict, with_judge)
    judge = None
    if with_judge:
        judge = {"status": NO_ANSWER, "detail": ""} if verdict is None else asdict(verdict)
    cited = rollout.cited_pages()
    return {
        **question_fields(record, method),
        "prediction": rollout.answer,
        "stop_reason": str(rollout.stop_reason),
        "gated": gated,
        "scores": scores,
        "judge": judge,
        "retrieval": ranking_scores(rollout.retrieved_pages, record.gold_pages),
        "cited": {"pages": cited, "gold": any(p in record.gold_pages for p in cited)},
        "process": process_counts(rollout),
        "trajectory": trajectory_record(rollout),
    }


def ranking_row(ranked: list[str], record: QARecord) -> dict:
    """The row of one question of the ``retrieval`` method."""
    return {
        **question_fields(record, Method.RETRIEVAL),
        "ranked": ranked,
        "retrieval": ranking_scores(ranked, record.gold_pages),
    }


def question_fields(record: QARecord, method: Method) -> dict:
    return {
        "qid": record.qid,
        "method": str(method),
        "data_source": record.data_source,
        "category": record.category,
        "question": record.question,
        "reference": record.answer,
        "gold_pages": record.gold_pages,
    }
