"""Retrieval benchmark: colpali-engine's scorer vs our exact MaxSim vs our FAISS + rerank, on synthetic corpora.

    python bench/retrieval.py                       # 10k and 100k pages
    python bench/retrieval.py --pages 10000         # one size

For each corpus size, in one run: a clustered synthetic multi-vector corpus (vrag_rl.retrieval.synthetic_vectors,
d=128) is written as a sharded index (float16 vectors, per-shard IVF over every token vector), then the same
batch of queries is answered by
  * colpali-engine's ``score_multi_vector`` (brute force, the baseline; timed on a subset of the pages, given
    as float32 tensors, and scaled linearly to the corpus: its cost is linear in the pages),
  * our exact mode (MaxSim over every page), with its products in float32 and, where the CPU has AMX or
    avx512_bf16 (``--bf16``), in bfloat16 (top 10 against float32's: the share of ``--agree-queries`` further,
    untimed queries with the same ten pages in the same order),
  * our approximate mode (FAISS candidates, exact rerank),
with queries/s, speed-ups, recall@10 of approximate against exact, and the exact mode's achieved FLOP/s against
this machine's matrix-multiply peak in each precision, measured in the same run, at its start and next to the
timings (bf16 is several times fp32 on CPUs with AMX or avx512_bf16, and a slow path elsewhere; exact search in
bf16 re-scores the scan's best pages in float32). Beside them, the single-vector index (``retrieval.dense_index``:
one CLIP / SigLIP-sized vector per page, d=768) on the same pages: each page's vector is its mean token vector
through a fixed random projection to 768 dimensions (queries likewise), so it keeps the corpus's topic structure;
FAISS exact, IVF and HNSW answer the same queries, with bytes per page on disk for both kinds of index. Neither
side's times include embedding the query. Timings are the best of ``--repeats`` runs
(the machine may be shared). Results go to stdout and, as JSON, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vrag_rl  # noqa: E402,F401  (torchvision shim before colpali-engine imports it)
from bench.machine import best_time, machine, matmul_peak  # noqa: E402
from vrag_rl.retrieval.dense_index import DenseIndexConfig, SingleVectorIndex  # noqa: E402
from vrag_rl.retrieval.index import MultiVectorIndex  # noqa: E402
from vrag_rl.retrieval.synthetic_vectors import SyntheticCorpus, SyntheticSpec  # noqa: E402
from vrag_rl.retrieval.types import IndexConfig  # noqa: E402

# Tokens per page by corpus size. ColQwen2 gives ~700 per page; 100k pages x 700 x 128 x 2 bytes would be
# 18 GB of float16 vectors before any FAISS index: more than a shared 24 GB machine holds, so 100k uses 256.
DEFAULT_TOKENS = {10_000: 700, 100_000: 256}
SINGLE_DIM = 768  # SigLIP base; CLIP ViT-B/32 has 512


def recall_at_10(found, exact) -> float:
    return float(np.mean([len({p for p, _ in a} & {p for p, _ in e}) / 10 for a, e in zip(found, exact)]))


def target_at_10(found, targets: list[str]) -> float:
    """Share of queries whose target page (the page the query was drawn from) is in the top 10."""
    return float(np.mean([t in {p for p, _ in f} for f, t in zip(found, targets)]))


def single_vector_rows(ids: list[str], means: np.ndarray, queries, targets, args, workdir: Path) -> dict:
    """The single-vector index on the same pages: exact, IVF and HNSW, q/s, recall@10, target@10, bytes per page."""
    projection = np.random.default_rng(0).standard_normal((means.shape[1], SINGLE_DIM)).astype(np.float32)

    def unit(x):
        y = x @ projection
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    pages, q = unit(means), unit(np.stack([t.numpy().mean(0) for t in queries]))
    rows, exact = {}, None
    for kind, search in (("exact", {}), ("ivf", {"nprobe": 16}), ("hnsw", {"ef_search": 64})):
        cfg = DenseIndexConfig(kind=kind)
        index = SingleVectorIndex.create(workdir / f"single-{kind}", [(i, "") for i in ids], pages, "synthetic", cfg)
        index.search(q[:1], 10, **search)
        seconds = best_time(lambda index=index, search=search: index.search(q, 10, **search), args.repeats)
        found = index.search(q, 10, **search)
        exact = exact or found
        rows[kind] = {
            "qps": len(q) / seconds,
            "bytes_per_page": index.bytes_per_page,
            "recall_at_10": recall_at_10(found, exact),
            "target_at_10": target_at_10(found, targets),
        }
        shutil.rmtree(workdir / f"single-{kind}")
    return {"dim": SINGLE_DIM, **rows}


def run_size(n_pages: int, tokens: int, args, peaks: dict[str, float], workdir: Path) -> dict:
    spec = SyntheticSpec(n_pages=n_pages, tokens=tokens, tokens_jitter=tokens // 16, seed=0)
    corpus = SyntheticCorpus(spec)
    nlist = args.nlist or (1024 if n_pages * tokens <= 10_000 * 700 else 2048)
    cfg = IndexConfig(
        shard_size=args.shard_size or -(-n_pages // 2),
        dtype="float16",
        approx="ivf",
        nlist=nlist,
        ivf_codec=args.ivf_codec,
        k_tokens=args.k_tokens,
        n_rerank=args.n_rerank,
    )
    print(
        f"\n== {n_pages} pages x ~{tokens} tokens, d={spec.dim}: building index ({cfg.ivf_codec}, "
        f"nlist={cfg.nlist or 'auto'}, {-(-n_pages // cfg.shard_size)} shards)",
        flush=True,
    )
    means = np.zeros((n_pages, spec.dim), np.float32)  # each page's mean token: its single-vector stand-in

    def pages_noting_means():
        for i, (pid, checksum, vectors) in enumerate(corpus.pages()):
            means[i] = vectors.numpy().mean(0)
            yield pid, checksum, vectors

    t0 = time.perf_counter()
    index = MultiVectorIndex.create(
        workdir / f"index-{n_pages}", pages_noting_means(), "synthetic", spec.dim, cfg, total=n_pages, progress=True
    )
    build_s = time.perf_counter() - t0
    n_tokens = sum(s["n_tokens"] for s in index.manifest["shards"])
    multi_bytes = sum(f.stat().st_size for f in (workdir / f"index-{n_pages}").glob("shard_*")) / n_pages
    queries, target_rows = corpus.queries(args.queries, tokens=args.query_tokens)
    targets = [corpus.page_id(i) for i in target_rows]
    lq = max(len(q) for q in queries)
    flops = 2 * n_tokens * spec.dim * len(queries) * lq  # one multiply-add per (page token, query token, dim)

    index.search(queries[:1], 10)  # warm up allocations and threads
    # A shared machine's peak moves: the best of the run's start and a measurement next to these timings.
    peaks = {name: max(v, matmul_peak(getattr(torch, name))) for name, v in peaks.items()}
    exact_s = best_time(lambda: index.search(queries, 10, "exact"), args.repeats)
    exact = index.search(queries, 10, "exact")
    bf16_row = {}
    if "bfloat16" in peaks:
        index.search(queries[:1], 10, "exact", compute_dtype="bfloat16")
        bf16_s = best_time(lambda: index.search(queries, 10, "exact", compute_dtype="bfloat16"), args.repeats)
        # Top-10 agreement over more queries than are timed (untimed, in batches of the timed size).
        more, _ = corpus.queries(args.agree_queries, tokens=args.query_tokens, seed=2)
        same = []
        for start in range(0, len(more), len(queries)):
            batch = more[start : start + len(queries)]
            fp32, bf16 = (index.search(batch, 10, "exact", compute_dtype=c) for c in ("float32", "bfloat16"))
            same += [[p for p, _ in a] == [p for p, _ in b] for a, b in zip(bf16, fp32)]
        bf16_row = {
            "bf16_peak_gflops": peaks["bfloat16"],
            "exact_bf16_qps": len(queries) / bf16_s,
            "exact_bf16_vs_fp32": exact_s / bf16_s,
            "exact_bf16_of_best_peak": flops / bf16_s / 1e9 / max(peaks.values()),
            "exact_bf16_same_top10": float(np.mean(same)),
            "agree_queries": len(same),
        }
    index.search(queries[:1], 10, "approx")
    approx_runs = []  # a small speed / recall trade-off curve over nprobe
    for nprobe in args.nprobe:
        approx_s = best_time(lambda n=nprobe: index.search(queries, 10, "approx", nprobe=n), args.repeats)
        approx = index.search(queries, 10, "approx", nprobe=nprobe)
        recall = recall_at_10(approx, exact)
        approx_runs.append(
            {"nprobe": nprobe, "qps": len(queries) / approx_s, "vs_exact": exact_s / approx_s, "recall_at_10": recall}
        )

    # Baseline: colpali-engine's scorer on a subset of pages (float32, as it expects), scaled to the corpus.
    from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor

    subset = min(n_pages, args.baseline_pages)
    pages = [corpus.page(i) for i in range(subset)]
    subset_tokens = sum(len(p) for p in pages)
    base_s = (
        best_time(lambda: BaseVisualRetrieverProcessor.score_multi_vector(queries, pages, device="cpu"), args.repeats)
        * n_tokens
        / subset_tokens
    )
    shutil.rmtree(workdir / f"index-{n_pages}")
    single = single_vector_rows([corpus.page_id(i) for i in range(n_pages)], means, queries, targets, args, workdir)

    q = len(queries)
    result = {
        "pages": n_pages,
        "tokens_per_page": tokens,
        "tokens_total": n_tokens,
        "dim": spec.dim,
        "queries": q,
        "query_tokens": lq,
        "build_s": round(build_s, 1),
        "baseline_qps": q / base_s,
        "exact_qps": q / exact_s,
        "exact_vs_baseline": base_s / exact_s,
        "exact_gflops": flops / exact_s / 1e9,
        "peak_gflops": peaks["float32"],
        "exact_of_peak": flops / exact_s / 1e9 / peaks["float32"],
        **bf16_row,
        "approx": approx_runs,
        "multi_vector_bytes_per_page": multi_bytes,
        "multi_vector_target_at_10": target_at_10(exact, targets),
        "single_vector": single,
        "baseline_subset_pages": subset,
        "config": {k: getattr(cfg, k) for k in ("shard_size", "dtype", "ivf_codec", "nlist", "k_tokens", "n_rerank")},
    }
    print(f"baseline (colpali-engine)  {result['baseline_qps']:8.3f} q/s   (build {build_s:.0f} s)")
    print(
        f"exact                      {result['exact_qps']:8.3f} q/s  {result['exact_vs_baseline']:5.1f}x baseline  "
        f"{result['exact_gflops']:.0f} GFLOP/s = {100 * result['exact_of_peak']:.0f}% of {peaks['float32']:.0f} peak"
    )
    if bf16_row:
        print(
            f"exact, bf16 products  {result['exact_bf16_qps']:8.3f} q/s  {result['exact_bf16_vs_fp32']:5.2f}x fp32 "
            f"{100 * result['exact_bf16_of_best_peak']:.0f}% of the best peak; "
            f"top 10 as fp32's for {100 * result['exact_bf16_same_top10']:.1f}% of {result['agree_queries']} queries"
        )
    for r in approx_runs:
        print(
            f"approx nprobe={r['nprobe']:<3}         {r['qps']:8.3f} q/s  {r['vs_exact']:5.1f}x exact     "
            f"recall@10 {r['recall_at_10']:.3f}",
            flush=True,
        )
    print(
        f"multi-vector index         {multi_bytes / 1024:8.1f} KiB per page (float16 vectors + SQ8 IVF)  "
        f"target@10 {result['multi_vector_target_at_10']:.3f}"
    )
    for kind in ("exact", "ivf", "hnsw"):
        r = single[kind]
        print(
            f"single-vector {kind:<5}        {r['qps']:8.0f} q/s  {r['qps'] / result['exact_qps']:7.0f}x multi exact  "
            f"{r['bytes_per_page'] / 1024:.1f} KiB per page  recall@10 {r['recall_at_10']:.3f}  "
            f"target@10 {r['target_at_10']:.3f}"
        )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pages", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        help="tokens per page, one per --pages value (default 700 at 10k, 256 at 100k: memory)",
    )
    p.add_argument("--queries", type=int, default=16)
    p.add_argument(
        "--query-tokens", type=int, default=20, help="ColQwen2 text queries: ~10 words + 10 augmentation tokens"
    )
    p.add_argument("--agree-queries", type=int, default=256, help="queries whose bf16 top 10 is checked against fp32")
    p.add_argument("--baseline-pages", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=0, help="default: two shards")
    p.add_argument("--ivf-codec", default="SQ8", help="SQ8: 1 byte per dimension (Flat needs 4x the memory)")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists per shard (default 1024, 2048 above 7M tokens)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--k-tokens", type=int, default=IndexConfig.k_tokens)
    p.add_argument("--n-rerank", type=int, default=IndexConfig.n_rerank)
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="auto: where the CPU has bf16 units")
    p.add_argument("--workdir", default=None, help="where index files go (removed after each size)")
    p.add_argument("--out", default=str(Path(__file__).with_name("retrieval-results.json")))
    args = p.parse_args()
    tokens = args.tokens or [DEFAULT_TOKENS.get(n, 700 if n <= 10_000 else 256) for n in args.pages]
    if len(tokens) != len(args.pages):
        p.error("give one --tokens value per --pages value")

    info = machine()
    peaks = {"float32": matmul_peak(torch.float32)}
    # Without AMX / avx512_bf16 a bf16 product is emulated, far below fp32: the rows would take hours.
    if args.bf16 == "on" or (args.bf16 == "auto" and info["bf16_flags"]):
        peaks["bfloat16"] = matmul_peak(torch.bfloat16)
    print(
        f"{info['cpu']} ({info['cpus']} CPUs, bf16 instructions {info['bf16_flags'] or 'none'}, torch "
        f"{info['torch']}, {info['torch_threads']} threads), {info['date']}; matmul peak GFLOP/s {peaks}"
    )
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vrag-bench-"))
    results = [run_size(n, t, args, peaks, workdir) for n, t in zip(args.pages, tokens)]
    Path(args.out).write_text(json.dumps({"machine": info, "results": results}, indent=1))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
