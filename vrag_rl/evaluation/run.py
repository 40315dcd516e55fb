"""An evaluation run: questions through one method into ``OUT/results.jsonl``, resumable after a kill.

Questions go in chunks (``chunk_size``): the chunk's tasks run as one batch on the engine (the agent loop
batches every turn), the judge scores its answers as one concurrent batch, and its rows are appended to the
results file and flushed to disk before the next chunk starts. A rerun with the same ``OUT`` reads the file,
drops a last line a kill cut short, and runs only the questions without a row: none is lost or done twice.
``OUT/settings.json`` holds the settings that change results; a rerun under other settings stops and names
the keys that differ.

One writer at a time per ``OUT`` (``records.writer_lock``; a second run stops at once naming the first), and only
the writer, under its lock, cuts a torn last line off the file. Readers (``read_results``: the report, teacher
data) never write it: a last line without its newline may be a row being appended, and is skipped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vrag_rl.data.records import QARecord, writer_lock
from vrag_rl.evaluation.metrics import RANK_CUTS, Method, ranking_row, rollout_row
from vrag_rl.flat_settings import differences
from vrag_rl.progress import progress_bar
from vrag_rl.reward.judge import JudgeClient, JudgeItem
from vrag_rl.rollout.engine import SamplingConfig
from vrag_rl.rollout.records import Task, make_groups
from vrag_rl.rollout.worker import RolloutBackend

RESULTS, SETTINGS = "results.jsonl", "settings.json"


@dataclass
class EvalRun:
    """What one run needs besides its questions: the parts (engine, retriever, judge) and their settings."""

    method: Method
    retriever: object  # ``search(queries, top_k, mode)``: retrieval.local.LocalRetriever or alike
    search_mode: str
    sampling: SamplingConfig
    backend: RolloutBackend | None = None  # None for the retrieval method
    judge: JudgeClient | None = None
    top_k: int = 3  # vanilla_rag: pages shown with the question
    seed: int = 0
    chunk_size: int = 16


def read_results(path: Path) -> dict[str, dict]:
    """Rows by question id, read only: a last line without its newline (being appended, or cut by a kill) is
    skipped, never cut off the file, which the writer may be appending to."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    rows = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
    return {row["qid"]: row for row in rows}


def repair_results(path: Path) -> None:
    """Cut a last line that a killed writer left without its newline; only the writer calls this, under its lock."""
    if not path.is_file():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())


def append_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def check_settings(out: Path, settings: dict[str, object]) -> None:
    """Record the settings in a new directory; in a used one, stop unless they are the same."""
    path = out / SETTINGS
    if path.is_file():
        diff = differences(json.loads(path.read_text()), settings)
        if diff:
            raise ValueError(
                f"{out} holds an evaluation with other settings; they would mix in one results file:\n  "
                + "\n  ".join(diff[:20])
                + "\nSet them back, or use another output directory."
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1, sort_keys=True))


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def tasks_for(run: EvalRun, records: list[QARecord]) -> list[Task]:
    tasks = make_groups([(r.qid, r.question) for r in records], 1, seed=run.seed)
    if run.method == Method.AGENT:
        return tasks
    if run.method == Method.DIRECT:
        return [Task(t.qid, t.question, t.group, t.sample, t.seed, context=()) for t in tasks]
    ranked = run.retriever.search([r.question for r in records], top_k=run.top_k, mode=run.search_mode)
    return [
        Task(t.qid, t.question, t.group, t.sample, t.seed, context=tuple(h.page_id for h in hits))
        for t, hits in zip(tasks, ranked)
    ]


def score_chunk(run: EvalRun, records: list[QARecord]) -> list[dict]:
    """The rows of one chunk of questions."""
    if run.method == Method.RETRIEVAL:
        ranked = run.retriever.search([r.question for r in records], top_k=max(RANK_CUTS), mode=run.search_mode)
        return [ranking_row([h.page_id for h in hits], r) for r, hits in zip(records, ranked)]
    rollouts = run.backend.rollout(tasks_for(run, records), run.sampling)
    verdicts: list = [None] * len(records)
    if run.judge is not None:
        answered = [i for i, r in enumerate(rollouts) if r.answer is not None]
        items = [JudgeItem(records[i].question, records[i].answer, rollouts[i].answer) for i in answered]
        for i, verdict in zip(answered, run.judge.judge_batch(items)):
            verdicts[i] = verdict
    with_judge = run.judge is not None
    return [rollout_row(*row, run.method, v, with_judge) for *row, v in zip(rollouts, records, verdicts)]


def evaluate(run: EvalRun, records: list[QARecord], out: Path, settings: dict[str, object]) -> dict[str, dict]:
    """Rows of every question in ``out/results.jsonl`` (see the module docstring); returns them by question id."""
    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out, "the evaluation"):  # before anything is written: a second run stops here
        check_settings(out, settings)
        path = out / RESULTS
        repair_results(path)
        return _run_chunks(run, records, path, read_results(path))


def _run_chunks(run: EvalRun, records: list[QARecord], path: Path, done: dict[str, dict]) -> dict[str, dict]:
    todo = [r for r in records if r.qid not in done]
    bar = progress_bar(total=len(records), initial=len(records) - len(todo), desc=f"eval {run.method}", unit="q")
    for chunk in chunks(todo, run.chunk_size):
        t0 = time.perf_counter()
        rows = score_chunk(run, chunk)
        seconds = time.perf_counter() - t0
        for row in rows:  # a batch is named by the number of rows written before it
            row["batch"] = {"first": len(done), "seconds": seconds, "questions": len(chunk)}
        append_rows(path, rows)
        done |= {row["qid"]: row for row in rows}
        bar.update(len(chunk))
    bar.close()
    return done
