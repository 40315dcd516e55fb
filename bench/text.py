"""Page text benchmark: the PDF's own text layer against tesseract OCR, on a real manual, side by side in one run.

    python bench/text.py                  # the first 60 pages of gnuplot's manual (make assets), 144 dpi
    python bench/text.py --pages 120 --dpi 100

The manual's pages are ingested once; then ``ocr_corpus`` writes each page's text with ``--source pdf`` (the text
layer, pypdfium2) and with ``--source ocr`` (tesseract, 2 workers) into two copies of the corpus, timed. Retrieval
quality: per page, a query of its four rarest words by poppler's ``pdftotext`` (neither source's own text), searched
with BM25 over each source's text; recall@1 and MRR@10 of the page. Results go to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vrag_rl  # noqa: E402,F401  (torchvision shim first)
from bench.machine import machine  # noqa: E402
from vrag_rl.data.records import load_pages  # noqa: E402
from vrag_rl.retrieval.bm25 import BM25Index  # noqa: E402
from vrag_rl.retrieval.ingest import IngestConfig, ingest  # noqa: E402
from vrag_rl.retrieval.ocr import load_ocr, ocr_corpus  # noqa: E402

MANUAL = ROOT / ".cache" / "assets" / "pdf" / "gnuplot.pdf"


def words(text: str) -> list[str]:
    return re.findall(r"\w+", unicodedata.normalize("NFC", text.lower()))


def queries_of(pdf: Path, pages: list[int]) -> dict[int, str]:
    texts = {}
    for k in pages:
        cmd = ["pdftotext", "-f", str(k), "-l", str(k), str(pdf), "-"]
        texts[k] = words(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    counts: dict[str, int] = {}
    for t in texts.values():
        for w in set(t):
            counts[w] = counts.get(w, 0) + 1
    return {k: " ".join(sorted(set(t), key=lambda w: (counts[w], w))[:4]) for k, t in texts.items() if t}


def quality(corpus: Path, queries: dict[int, str]) -> dict[str, float]:
    rows = load_ocr(corpus)
    by_page = {p.page_id: p.page for p in load_pages(corpus)}
    index = BM25Index()
    index.build([r.page_id for r in rows], [r.text for r in rows])
    hits = index.search(list(queries.values()), top_k=10)
    ranks = [next((i for i, (pid, _) in enumerate(h) if by_page[pid] == k), None) for k, h in zip(queries, hits)]
    return {
        "recall@1": sum(r == 0 for r in ranks) / len(ranks),
        "mrr@10": sum(1 / (r + 1) for r in ranks if r is not None) / len(ranks),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pages", type=int, default=60)
    p.add_argument("--dpi", type=float, default=144)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("text-results.json"))
    args = p.parse_args()
    if not MANUAL.is_file():
        raise SystemExit(f"{MANUAL} is missing: run `make assets`")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "manual"
        ingest([MANUAL], base, IngestConfig(dpi=args.dpi, max_pages=args.pages), progress=False)
        queries = queries_of(MANUAL, [p.page for p in load_pages(base)])
        for source in ("pdf", "ocr"):
            corpus = Path(tmp) / source
            shutil.copytree(base, corpus, ignore=shutil.ignore_patterns(".writer.lock"))
            t0 = time.perf_counter()
            ocr_corpus(corpus, progress=False, source=source, workers=2)
            seconds = time.perf_counter() - t0
            results[source] = {"seconds": seconds, "pages": len(load_pages(corpus)), **quality(corpus, queries)}
    pdf, ocr = results["pdf"], results["ocr"]
    print(f"{'source':8} {'pages':>6} {'seconds':>9} {'s/page':>8} {'recall@1':>9} {'MRR@10':>7}")
    for name, r in results.items():
        print(
            f"{name:8} {r['pages']:6d} {r['seconds']:9.2f} {r['seconds'] / r['pages']:8.4f} "
            f"{r['recall@1']:9.3f} {r['mrr@10']:7.3f}"
        )
    print(f"tesseract / text layer time: {ocr['seconds'] / pdf['seconds']:.0f}x")
    report = {"machine": machine(), "settings": {**vars(args), "out": str(args.out)}, "results": results}
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
