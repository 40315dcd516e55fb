"""Teacher trajectories for the supervised warm start, from an evaluation run (``python -m vrag_rl.eval sft-data``).

Run the agent with a teacher (a large model behind an endpoint) through the evaluation harness, then keep the
trajectories whose answer is correct — by the judge, or by exact match — and that were shown a gold page. The
kept recordings (question, turns, pages shown) are written as JSON lines; ``sft.teacher_data`` trains on them
beside or instead of the synthetic expert trajectories, replayed through the agent loop
(``rollout.replay``) under the training run's agent settings.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from vrag_rl.rollout.replay import Recording

KEEP_BY = ("judge", "exact_match")


def keep_reason(row: dict, by: str) -> str | None:
    """Why ``row`` is not kept, or None when it is."""
    if "trajectory" not in row:
        return "no trajectory (retrieval method)"
    if row.get("method") != "agent":
        return f"method {row.get('method')} is not the agent's"
    if by == "judge" and row.get("judge") is None:
        return "the run had no judge"
    if row["scores"][by] != 1.0:
        return f"not correct by {by}"
    if not set(row["trajectory"]["retrieved_pages"]) & set(row["gold_pages"]):
        return "no gold page shown"
    return None


def write_sft_data(rows: list[dict], out: Path, by: str = "judge") -> Counter:
    """The kept rows' recordings in ``out`` (JSON lines); returns how many rows were kept or left, and why."""
    if by not in KEEP_BY:
        raise ValueError(f"keep by one of {KEEP_BY}, got {by!r}")
    tally: Counter = Counter()
    kept = []
    for row in rows:
        reason = keep_reason(row, by)
        tally[reason or "kept"] += 1
        if reason is None:
            traj = row["trajectory"]
            kept.append(Recording(row["qid"], row["question"], traj["texts"], traj["views"]).__dict__)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept))
    return tally


def load_recordings(path: Path) -> list[Recording]:
    return [Recording(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
