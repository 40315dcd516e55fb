"""``OUT/results.jsonl`` read while it is written: readers (``eval report``, ``eval sft-data``) never write it, and
only the writer, holding the directory's writer lock, cuts a line that a kill left torn. The concurrent writer is a
real process appending a row in two writes, as a large append or a kill mid-write leaves it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vrag_rl.data.records import WriterBusy, load_qa
from vrag_rl.eval import main
from vrag_rl.evaluation.metrics import Method, ranking_row
from vrag_rl.evaluation.run import RESULTS, SETTINGS, EvalRun, evaluate, read_results
from vrag_rl.retrieval.types import Hit
from vrag_rl.rollout.engine import SamplingConfig

WRITER = """
import json, sys
from pathlib import Path
from vrag_rl.data.records import writer_lock

out, row = Path(sys.argv[1]), sys.argv[2]
with writer_lock(out, "evaluation"), open(out / "results.jsonl", "a") as f:
    f.write(row[: len(row) // 2])
    f.flush()
    print("torn", flush=True)
    sys.stdin.readline()
    f.write(row[len(row) // 2 :] + "\\n")
"""


class GoldFirst:
    """Ranks each question's gold pages first (what the retrieval method asks of a retriever: ``search``)."""

    def __init__(self, records):
        self.gold = {r.question: r.gold_pages for r in records}

    def search(self, queries, top_k, mode):
        return [[Hit(p, 1.0, "") for p in self.gold[q][:top_k]] for q in queries]


def row_of(record) -> dict:
    """A retrieval row as ``evaluate`` writes it."""
    return ranking_row(record.gold_pages, record) | {"batch": {"first": 0, "seconds": 0.1, "questions": 1}}


@pytest.fixture
def run_dir(bundled_corpus, tmp_path) -> tuple[Path, list]:
    """A retrieval run's directory holding two finished rows; the records of five questions."""
    records = load_qa(bundled_corpus)[:5]
    out = tmp_path / "eval"
    out.mkdir()
    settings = {"method": "retrieval", "corpus": str(bundled_corpus), "search_mode": "text"}
    (out / SETTINGS).write_text(json.dumps(settings))
    rows = [row_of(r) for r in records[:2]]
    (out / RESULTS).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out, records


def test_readers_during_a_write_cut_no_row(run_dir, tmp_path):
    out, records = run_dir
    row = json.dumps(row_of(records[2]))
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), row], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "torn"
        before = (out / RESULTS).read_bytes()
        assert main(["report", str(out)]) == 0
        assert json.loads((out / "report.json").read_text())["questions"] == 2  # the torn row is not yet one
        assert main(["sft-data", str(out), "--to", str(tmp_path / "sft.jsonl"), "--keep-by", "exact_match"]) == 0
        assert (out / RESULTS).read_bytes() == before  # the readers wrote nothing
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(timeout=30) == 0
    finally:
        writer.kill()
        writer.wait()
    lines = (out / RESULTS).read_text().splitlines()
    assert [json.loads(line)["qid"] for line in lines] == [r.qid for r in records[:3]]


def test_only_the_writer_repairs_a_torn_line_under_its_lock(run_dir):
    out, records = run_dir
    path = out / RESULTS
    with open(path, "a") as f:
        f.write('{"qid": "cut by a kill", "ran')  # a row a kill cut short
    torn = path.read_bytes()
    assert list(read_results(path)) == [r.qid for r in records[:2]] and path.read_bytes() == torn
    job = EvalRun(Method.RETRIEVAL, GoldFirst(records), "text", SamplingConfig(), chunk_size=2)
    settings = json.loads((out / SETTINGS).read_text())
    holder = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), "{}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "torn"
        held = path.read_bytes()
        with pytest.raises(WriterBusy, match=f"pid {holder.pid}"):
            evaluate(job, records, out, settings)
        assert path.read_bytes() == held  # a second writer stops before it touches the file
    finally:
        holder.kill()
        holder.wait()
    rows = evaluate(job, records, out, settings)  # the writer: cuts the torn tail, then appends
    assert list(rows) == [r.qid for r in records]
    lines = path.read_text().splitlines()
    assert [json.loads(line)["qid"] for line in lines] == [r.qid for r in records]
