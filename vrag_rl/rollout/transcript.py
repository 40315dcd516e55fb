"""Readable transcripts of rollouts: per turn, what the model wrote, the action it took and what it saw.

``transcript(rollout)`` turns the token-level record into turns; ``write_html`` lays them out as one page
with the images the model was shown (and each crop box drawn on the image it was cut from), so a person can
follow the agent: think, search, crop, answer.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from PIL import Image, ImageDraw

from vrag_rl.agent.actions import ActionKind
from vrag_rl.rollout.records import Rollout


def transcript(rollout: Rollout, tokenizer, image_token_id: int) -> list[dict]:
    """One dict per assistant turn: text, action, and the observation that followed (images, feedback)."""
    turns: list[dict] = []
    image_index = 0
    segments = rollout.trajectory.segments
    for seg in segments[1:]:
        if seg.role == "model":
            action = rollout.actions[len(turns)]
            turns.append(
                {
                    "text": rollout.texts[len(turns)],
                    "action": action.kind,
                    "think": action.think,
                    "content": action.content,
                    "reason": action.reason,
                    "images": [],
                    "feedback": None,
                }
            )
        elif turns:
            turns[-1]["images"] = list(range(image_index, image_index + seg.num_images))
            image_index += seg.num_images
            text = tokenizer.decode([i for i in seg.ids if i != image_token_id], skip_special_tokens=False)
            body = text.split("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
            turns[-1]["feedback"] = body.replace("<|vision_start|>", "").replace("<|vision_end|>", "").strip() or None
    return turns


def _boxed(image: Image.Image, box: list[float]) -> Image.Image:
    out = image.copy()
    ImageDraw.Draw(out).rectangle([float(v) for v in box], outline=(230, 20, 20), width=2)
    return out


def write_transcripts(
    rollouts: list[Rollout], extras: list[dict], tokenizer, image_token_id: int, out_dir: Path
) -> Path:
    """``trajectories.jsonl``, the shown images (PNG) and ``index.html`` in ``out_dir``; returns the HTML path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    cards = []
    with open(out_dir / "trajectories.jsonl", "w") as f:
        for n, (r, extra) in enumerate(zip(rollouts, extras)):
            turns = transcript(r, tokenizer, image_token_id)
            files = []
            for k, image in enumerate(r.trajectory.images):
                name = f"images/{n:03d}_{k}.png"
                image.save(out_dir / name)
                files.append(name)
            record = {
                "qid": r.task.qid,
                "question": r.task.question,
                "group": r.task.group,
                "sample": r.task.sample,
                "stop_reason": r.stop_reason,
                "answer": r.answer,
                "retrieved_pages": r.retrieved_pages,
                "crops": [[p, list(b)] for p, b in r.crops],
                "num_invalid": r.num_invalid,
                "num_tokens": len(r.trajectory),
                "turns": turns,
                "images": files,
                **extra,
            }
            f.write(json.dumps(record) + "\n")
            cards.append(_card(record, r, out_dir, n))
    page = out_dir / "index.html"
    page.write_text(_PAGE.format(body="\n".join(cards)))
    return page


def _card(record: dict, rollout: Rollout, out_dir: Path, n: int) -> str:
    e = html.escape
    rows = []
    last_image = None  # index of the most recent image shown: a bbox refers to it
    for t, turn in enumerate(record["turns"]):
        img = ""
        if turn["action"] == ActionKind.BBOX and last_image is not None and rollout.actions[t].bbox is not None:
            name = f"images/{n:03d}_{last_image}_box{t}.png"
            _boxed(rollout.trajectory.images[last_image], rollout.actions[t].bbox).save(out_dir / name)
            img += f'<figure><img src="{name}"><figcaption>crop box on the image it refers to</figcaption></figure>'
        for k in turn["images"]:
            img += f'<figure><img src="{record["images"][k]}"><figcaption>shown to the model</figcaption></figure>'
            last_image = k
        feedback = f'<p class="fb">{e(turn["feedback"])}</p>' if turn["feedback"] else ""
        reason = f" — {e(turn['reason'])}" if turn["reason"] else ""
        rows.append(
            f'<div class="turn"><div class="act {e(turn["action"])}">{e(turn["action"])}{reason}</div>'
            f"<pre>{e(turn['text'])}</pre>{img}{feedback}</div>"
        )
    reward = record.get("reward")
    score = (
        f" · reward {reward['total']:.2f} (ndcg {reward['ndcg']:.2f}, answer {reward['answer']:.2f})" if reward else ""
    )
    head = (
        f"<h2>{e(record['qid'])} · sample {record['sample']}</h2><p><b>Q:</b> {e(record['question'])}"
        f"<br><b>reference:</b> {e(str(record.get('reference', '')))}"
        f" · <b>gold:</b> {e(', '.join(record.get('gold_pages', [])))}"
        f"<br><b>answer:</b> {e(str(record['answer']))} · stop: {e(record['stop_reason'])} · "
        f"retrieved: {e(', '.join(record.get('retrieved_labels', record['retrieved_pages'])) or 'none')}{score}</p>"
    )
    return f"<section>{head}{''.join(rows)}</section>"


_PAGE = """<!doctype html><meta charset="utf-8"><title>vrag-rl rollouts</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} section{{border-top:2px solid #333;margin:2em 0}}
.turn{{margin:1em 0;padding:.5em;background:#f6f6f6}} pre{{white-space:pre-wrap}}
img{{max-height:360px;border:1px solid #999}}
figure{{display:inline-block;margin:.3em}} figcaption{{font-size:.8em;color:#555}} .fb{{color:#a40}}
.act{{font-weight:bold}} .invalid{{color:#c00}} .answer{{color:#080}} .search{{color:#04a}} .bbox{{color:#808}}</style>
<h1>vrag-rl rollouts</h1>
{body}
"""
