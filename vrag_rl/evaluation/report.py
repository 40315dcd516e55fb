"""The report of an evaluation run, from its rows: the paper's Table 1 layout in Markdown and JSON.

Columns are the Table 1 cells the questions fall in, in the paper's order (SlideVQA single-hop, multi-hop ·
ViDoSeek extraction, logic · MMLongBench text, table, chart, figure, layout), then the cells of any other data
source, then two overall columns: ``overall_questions``, the mean over all questions (each counted once), and
``overall_datasets``, the mean of the per-dataset means. A question with several categories (an MMLongBench
question with evidence in a chart and a table) counts in each of their cells, once in the overall columns.
Rows are the answer metrics (percent): the judge's verdict where a judge was used, exact match, F1, ANLS;
for the ``retrieval`` method, recall / NDCG / MRR at 1, 5 and 10 instead. Process metrics follow.
"""

from __future__ import annotations

from collections import Counter
from statistics import fmean

from vrag_rl.data.convert import CATEGORY_SEPARATOR, PAPER_COLUMNS
from vrag_rl.evaluation.metrics import ANSWER_METRICS, GATES, RANK_CUTS, Method
from vrag_rl.rollout.scoring import process_rates

OVERALL = ("overall_questions", "overall_datasets")
RANK_METRICS = tuple(f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in RANK_CUTS)


def question_cells(row: dict) -> list[str]:
    return [f"{row['data_source']}/{c}" for c in (row["category"] or "uncategorised").split(CATEGORY_SEPARATOR)]


def column_order(rows: list[dict]) -> list[str]:
    present = {cell for row in rows for cell in question_cells(row)}
    paper = [f"{s}/{c}" for s, columns in PAPER_COLUMNS.items() for c in columns if f"{s}/{c}" in present]
    return paper + sorted(present - set(paper))


def value(row: dict, metric: str) -> float | None:
    if metric in RANK_METRICS:
        return row["retrieval"][metric]
    return row.get("scores", {}).get(metric)


def metric_table(rows: list[dict], metric: str) -> dict[str, float]:
    """Mean of ``metric`` per cell and overall, or {} when no row has it."""
    scored = [(row, v) for row in rows if (v := value(row, metric)) is not None]
    if not scored:
        return {}
    per_cell: dict[str, list[float]] = {}
    per_source: dict[str, list[float]] = {}
    for row, v in scored:
        for cell in question_cells(row):
            per_cell.setdefault(cell, []).append(v)
        per_source.setdefault(row["data_source"], []).append(v)
    table = {cell: fmean(per_cell[cell]) for cell in column_order([row for row, _ in scored])}
    table[OVERALL[0]] = fmean(v for _, v in scored)
    table[OVERALL[1]] = fmean(fmean(vs) for vs in per_source.values())
    return table


def table_metrics(rows: list[dict], metrics: tuple[str, ...], prefix: str) -> dict[str, float]:
    """The tables of ``metrics`` as flat ``{prefix}{cell}/{metric}`` numbers (training's validation logs them)."""
    return {f"{prefix}{cell}/{m}": v for m in metrics for cell, v in metric_table(rows, m).items()}


def process_metrics(rows: list[dict]) -> dict[str, float]:
    """What the agent did (``rollout.scoring.process_rates``, as training logs it), how often its cited page
    was a gold page and its answer was gated, and the run's throughput."""
    generated = [row for row in rows if "process" in row]
    seconds = sum({row["batch"]["first"]: row["batch"]["seconds"] for row in rows}.values())
    out: dict[str, float] = {"questions": len(rows), "seconds": seconds}
    out["questions_per_s"] = len(rows) / seconds if seconds else 0.0
    if generated:
        out |= process_rates([row["process"] for row in generated])
        out["cited_gold_rate"] = fmean(row["cited"]["gold"] for row in generated)
        out["gated_rate"] = fmean(row["gated"] for row in generated)
    return out


def build_report(rows: list[dict], settings: dict[str, object]) -> dict:
    method = Method.parse(str(settings["method"]), "method")
    metrics = RANK_METRICS if method == Method.RETRIEVAL else (*ANSWER_METRICS, *RANK_METRICS)
    tables = {m: t for m in metrics if (t := metric_table(rows, m))}
    judge = Counter(row["judge"]["status"] for row in rows if row.get("judge"))
    return {
        "method": str(method),
        "gate": GATES[method],
        "settings": settings,
        "questions": len(rows),
        "columns": column_order(rows),
        "tables": tables,
        "process": process_metrics(rows),
        "judge_statuses": dict(judge),
    }


def _header(columns: list[str]) -> list[str]:
    return ["metric", *columns, *OVERALL]


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# Evaluation: {report['method']}, {report['questions']} questions",
        "",
        f"- policy: `{s.get('policy')}`" + (f" at `{s['endpoint']}`" if s.get("endpoint") else ""),
        f"- corpus: `{s.get('corpus')}`, search mode `{s.get('search_mode')}`",
        f"- judge: {_judge_line(s)}",
        f"- gate: {report['gate']}",
        "- overall_questions: mean over questions; overall_datasets: mean of the per-dataset means",
        "",
    ]
    lines += _table_lines(report["columns"], report["tables"], lambda v: f"{100 * v:.1f}")
    if report["judge_statuses"]:
        lines += ["", "Judge statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(report["judge_statuses"].items()))]
    lines += ["", "| process | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in report["process"].items()]
    return "\n".join(lines) + "\n"


def _judge_line(settings: dict) -> str:
    if not settings.get("judge.model"):
        return "none (rule metrics only)"
    prompt = settings["judge.prompt_sha256"][:12]
    return f"`{settings['judge.model']}` at `{settings['judge.base_url']}` (prompt sha256 {prompt})"


def _table_lines(columns: list[str], tables: dict[str, dict], fmt) -> list[str]:
    header = _header(columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric, table in tables.items():
        cells = [fmt(table[c]) if c in table else "–" for c in header[1:]]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return lines


def _run_line(report: dict) -> str:
    s = report["settings"]
    policy = f", policy {s['policy']}" if report["method"] != Method.RETRIEVAL else ""
    return (
        f"{report['method']}, search {s['search_mode']}{policy}, {report['questions']} questions, corpus {s['corpus']}"
    )


def compare(a: dict, b: dict) -> str:
    """The two reports' tables side by side: each cell ``A → B (B - A)`` in percent points."""
    columns = a["columns"] + [c for c in b["columns"] if c not in a["columns"]]
    metrics = [m for m in a["tables"] if m in b["tables"]]
    lines = [f"{name}: {_run_line(r)}" for name, r in (("A", a), ("B", b))] + [""]
    header = _header(columns)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in metrics:
        cells = []
        for c in header[1:]:
            x, y = a["tables"][metric].get(c), b["tables"][metric].get(c)
            cells.append("–" if x is None or y is None else f"{100 * x:.1f} → {100 * y:.1f} ({100 * (y - x):+.1f})")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
