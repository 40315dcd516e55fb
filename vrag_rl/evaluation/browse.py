"""``OUT/index.html``: an evaluation run's questions to browse, built from its rows alone (so also after a resume).

One card per question: the question, reference, gold pages, the prediction and its scores, then every turn the
model wrote with the page it was shown after it (a thumbnail) and each crop box drawn where it was cut from the
page. Filters (no scripts or styles from elsewhere; the page works offline) show only wrong, unanswered or
invalid-action questions. Thumbnails of the pages shown go to ``OUT/pages/``, read only from files inside the
corpus and named so that no page id (from a manifest, so untrusted) becomes a path or markup.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from vrag_rl.data.records import load_pages, page_label
from vrag_rl.retrieval.base import PageCatalog

THUMB_SIDE = 480


def is_wrong(row: dict) -> bool:
    """Not correct by the judge where there was one, else by exact match."""
    scores = row.get("scores", {})
    key = "judge" if scores.get("judge") is not None else "exact_match"
    return scores.get(key, 0.0) < 1.0


def thumbnail_name(page_id: str) -> str:
    """The thumbnail's path relative to ``OUT``: the page id where it is a plain file name, else a digest of it (page
    ids come from a manifest, which may hold ``..``, slashes or markup)."""
    if re.fullmatch(r"\w[\w.-]*", page_id):
        return f"pages/{page_id}.jpg"
    return f"pages/ids/{hashlib.sha256(page_id.encode()).hexdigest()[:32]}.jpg"  # no plain id has a slash


def _thumbnails(rows: list[dict], corpus: Path, out: Path) -> dict[str, tuple[str, int, int, str]]:
    """page id -> (thumbnail path relative to ``out``, raw width, raw height, label) of every page a row refers to
    whose file is inside the corpus (read through the catalog, which resolves symlinks)."""
    wanted = {page for row in rows for page in _pages_of(row)}
    catalog = PageCatalog(corpus)
    found = {}
    for page in load_pages(corpus):
        if page.page_id not in wanted:
            continue
        name = thumbnail_name(page.page_id)
        if not (out / name).is_file():
            try:
                with Image.open(catalog.page_path(page.page_id)) as im:
                    im = im.convert("RGB")
                    im.thumbnail((THUMB_SIDE, THUMB_SIDE))
            except (KeyError, ValueError, OSError, Image.DecompressionBombError):
                continue  # outside the corpus, gone or unreadable: shown as not in the corpus
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            im.save(out / name, quality=85)
        found[page.page_id] = (name, page.width, page.height, page_label(page.page_id, page.timestamp))
    return found


def _pages_of(row: dict) -> list[str]:
    traj = row.get("trajectory", {})
    return [v[1] for v in traj.get("views", [])] + traj.get("retrieved_pages", []) + row.get("ranked", [])[:3]


def _figure(page: str, box: list[int] | None, thumbs: dict, caption: str) -> str:
    if page not in thumbs:
        return f"<p class='fb'>page {html.escape(page)} (not in the corpus)</p>"
    name, width, height, label = thumbs[page]
    caption = caption.replace(page, label, 1)
    overlay = ""
    if box is not None:
        x0, y0, x1, y1 = box
        style = f"left:{100 * x0 / width:.2f}%;top:{100 * y0 / height:.2f}%;"
        style += f"width:{100 * (x1 - x0) / width:.2f}%;height:{100 * (y1 - y0) / height:.2f}%"
        overlay = f"<span class='box' style='{style}'></span>"
    return (
        f"<figure><div class='page'><img src='{html.escape(quote(name))}' alt='{html.escape(page)}'>{overlay}</div>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _card(row: dict, thumbs: dict) -> str:
    e = html.escape
    traj = row.get("trajectory", {})
    scores = ", ".join(f"{k} {v:.2f}" for k, v in row.get("scores", {}).items() if v is not None)
    flags = {
        "wrong": "process" in row and is_wrong(row),
        "unanswered": "process" in row and row.get("prediction") is None,
        "invalid": row.get("process", {}).get("invalid", 0) > 0,
    }
    head = (
        f"<h2>{e(row['qid'])} · {e(row['data_source'])}/{e(row['category'])}</h2>"
        f"<p><b>Q:</b> {e(row['question'])}<br><b>reference:</b> {e(row['reference'])} · <b>gold:</b> "
        f"{e(', '.join(row['gold_pages']))}<br><b>prediction:</b> {e(str(row.get('prediction')))}"
        f" · stop: {e(str(row.get('stop_reason', '-')))} · {e(scores)}"
        f" · ndcg@10 {row['retrieval']['ndcg@10']:.2f}</p>"
    )
    body = []
    if row.get("method") == "vanilla_rag":
        body.append("".join(_figure(p, None, thumbs, f"{p}, given with the question") for p in traj["retrieved_pages"]))
    if row.get("ranked"):
        body.append("".join(_figure(p, None, thumbs, f"rank {k + 1}: {p}") for k, p in enumerate(row["ranked"][:3])))
    for t, (text, action) in enumerate(zip(traj.get("texts", []), traj.get("actions", []))):
        shown = "".join(
            _figure(page, box, thumbs, f"{page}: the crop box" if box else f"{page}: the page shown")
            for turn, page, box in traj.get("views", [])
            if turn == t
        )
        body.append(
            f"<div class='turn'><div class='act {e(action['kind'])}'>{e(action['kind'])}</div>"
            f"<pre>{e(text)}</pre>{shown}</div>"
        )
    data = " ".join(f"data-{k}='{int(v)}'" for k, v in flags.items())
    return f"<section {data}>{head}{''.join(body)}</section>"


def write_browser(rows: list[dict], corpus: Path, out: Path, title: str) -> Path:
    thumbs = _thumbnails(rows, corpus, out)
    cards = "\n".join(_card(row, thumbs) for row in rows)
    page = out / "index.html"
    page.write_text(_PAGE.format(title=html.escape(title), count=len(rows), body=cards, rows=json.dumps(len(rows))))
    return page


_PAGE = """<!doctype html><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} section{{border-top:2px solid #333;margin:2em 0}}
.turn{{margin:1em 0;padding:.5em;background:#f6f6f6}} pre{{white-space:pre-wrap}} .fb{{color:#a40}}
figure{{display:inline-block;margin:.3em;vertical-align:top}} figcaption{{font-size:.8em;color:#555}}
.page{{position:relative;display:inline-block}} .page img{{max-height:360px;border:1px solid #999;display:block}}
.box{{position:absolute;border:2px solid #e01414;box-sizing:border-box}} .act{{font-weight:bold}}
.invalid{{color:#c00}} .answer{{color:#080}} .search{{color:#04a}} .bbox{{color:#808}} .hidden{{display:none}}</style>
<h1>{title}</h1>
<p>{count} questions · show only:
<label><input type="checkbox" data-filter="wrong"> wrong</label>
<label><input type="checkbox" data-filter="unanswered"> unanswered</label>
<label><input type="checkbox" data-filter="invalid"> with invalid actions</label> · <span id="shown"></span></p>
{body}
<script>
function apply() {{
  const on = [...document.querySelectorAll('input[data-filter]')].filter(b => b.checked).map(b => b.dataset.filter);
  let n = 0;
  for (const s of document.querySelectorAll('section')) {{
    const keep = on.every(f => s.dataset[f] === '1');
    s.classList.toggle('hidden', !keep);
    n += keep;
  }}
  document.getElementById('shown').textContent = n + ' of ' + {rows} + ' shown';
}}
document.querySelectorAll('input[data-filter]').forEach(b => b.addEventListener('change', apply));
apply();
</script>
"""
