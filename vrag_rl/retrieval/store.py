"""On-disk format of the multi-vector index: config, manifest, shard files, checksums (see index.py); its
manifest checks (format, page list, embedder fingerprint, corpus staleness) serve the single-vector index too.

Every file is written through a temporary name of its own (``records.temp_path``) and renamed; the manifest
is written last, so an index directory is complete exactly when its manifest exists, and ``add`` never
exposes half-written shards. One writer at a time: building and adding hold the index's ``writer_lock``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vrag_rl.data.records import atomic_write_bytes, load_pages, page_checksum, sha256_file, temp_path
from vrag_rl.retrieval import approx
from vrag_rl.retrieval.maxsim import plan_chunks
from vrag_rl.retrieval.types import FaissKind, IndexConfig, Shard

FORMAT = "vrag-rl.multivector-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class StaleIndexError(RuntimeError):
    """The index cannot serve: ``reason`` is missing, version, fingerprint, checksum or corpus."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"[{reason}] {message}")
        self.reason = reason


def pages_checksum(pages: list[list[str]]) -> str:
    return hashlib.sha256("".join(f"{pid}\t{cs}\n" for pid, cs in pages).encode()).hexdigest()


def corpus_drift(indexed_pages: list[list[str]], corpus_dir) -> str | None:
    """What changed in the corpus since an index of ``indexed_pages`` ([page id, image checksum]) was built:
    a sentence naming added, removed and changed pages, or None when the index is current."""
    current = {p.page_id: page_checksum(p) for p in load_pages(corpus_dir)}
    indexed = dict(indexed_pages)
    added = [pid for pid in current if pid not in indexed]
    removed = [pid for pid in indexed if pid not in current]
    changed = [pid for pid in indexed if pid in current and current[pid] != indexed[pid]]
    parts = [
        f"{len(v)} {k} (e.g. {', '.join(v[:3])})"
        for k, v in (("added", added), ("removed", removed), ("changed", changed))
        if v
    ]
    return "pages " + "; ".join(parts) if parts else None


def save_npy(path: Path, array: np.ndarray) -> str:
    tmp = temp_path(path)
    with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
        np.save(f, array)
    tmp.replace(path)
    return sha256_file(path)


def write_shards(out_dir: Path, manifest: dict, pages: Iterable[tuple[str, str, Tensor]], total, progress) -> None:
    """Append shards of ``shard_size`` pages to ``out_dir`` and to ``manifest`` (not written here)."""
    cfg = IndexConfig(**manifest["config"])
    dtype = np.float16 if cfg.dtype == "float16" else np.float32
    known = {pid for pid, _ in manifest["pages"]}
    batch: list[tuple[str, str, np.ndarray]] = []  # vectors already in the storage dtype

    def flush():
        shard_id = len(manifest["shards"])
        first = len(manifest["pages"])
        lengths = np.array([len(v) for _, _, v in batch], dtype=np.int64)
        perm = np.argsort(lengths, kind="stable")  # equal lengths side by side: long MaxSim runs
        vectors = np.concatenate([batch[i][2] for i in perm])
        table = np.stack([first + perm, lengths[perm]], axis=1).astype(np.int64)
        stem = f"shard_{shard_id:05d}"
        entry = {
            "id": shard_id,
            "n_pages": len(batch),
            "n_tokens": int(lengths.sum()),
            "vectors": f"{stem}.vectors.npy",
            "pages": f"{stem}.pages.npy",
            "faiss": None,
            "sha256": {},
        }
        entry["sha256"]["vectors"] = save_npy(out_dir / entry["vectors"], vectors)
        entry["sha256"]["pages"] = save_npy(out_dir / entry["pages"], table)
        if cfg.approx != FaissKind.NONE:
            entry["faiss"] = f"{stem}.faiss"
            entry["sha256"]["faiss"] = approx.build_and_save(vectors, cfg, out_dir / entry["faiss"], progress)
        manifest["shards"].append(entry)
        manifest["pages"] += [[pid, cs] for pid, cs, _ in batch]
        batch.clear()

    from vrag_rl.progress import progress_bar

    for pid, checksum, vectors in progress_bar(
        pages, total=total, desc="index pages", unit="page", disable=not progress
    ):
        if pid in known:
            raise ValueError(f"page {pid!r} is already indexed or given twice")
        known.add(pid)
        v = vectors.detach().float().cpu()
        if v.ndim != 2 or v.shape[1] != manifest["dim"] or len(v) == 0:
            raise ValueError(f"page {pid}: expected (n_tokens >= 1, {manifest['dim']}) vectors, got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"page {pid}: embedding has NaN/inf values")
        batch.append((pid, checksum, v.numpy().astype(dtype)))
        if len(batch) == cfg.shard_size:
            flush()
    if batch:
        flush()
    manifest["corpus_checksum"] = pages_checksum(manifest["pages"])


def write_manifest(index_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(index_dir / MANIFEST, json.dumps(manifest, indent=1).encode())


def read_manifest(
    index_dir: Path,
    fmt: str = FORMAT,
    version: int = FORMAT_VERSION,
    *,
    expected_fingerprint: str | None = None,
    corpus_dir=None,
    name: str = "index",
    remedy: str = "Rebuild the index",
) -> dict:
    """An index's manifest, checked: present, JSON, of format ``fmt`` at ``version``, its page list intact,
    built by the query embedder's model (``expected_fingerprint``) and current for ``corpus_dir``.

    ``name`` is what errors call the index, ``remedy`` what they advise when the corpus has changed.
    """
    path = index_dir / MANIFEST
    if not path.is_file():
        raise StaleIndexError("missing", f"no index at {index_dir} ({MANIFEST} not found); build one first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StaleIndexError("checksum", f"{path} is not valid JSON ({err}): the index is damaged") from err
    if manifest.get("format") != fmt or manifest.get("format_version") != version:
        raise StaleIndexError(
            "version",
            f"{path}: format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r}, this code reads {fmt!r} version "
            f"{version}: rebuild the index",
        )
    if pages_checksum(manifest["pages"]) != manifest["corpus_checksum"]:
        raise StaleIndexError("checksum", f"{path}: page list does not match its checksum (edited by hand?)")
    if expected_fingerprint is not None and expected_fingerprint != manifest["fingerprint"]:
        raise StaleIndexError(
            "fingerprint",
            f"{name} {index_dir} was built by another model (embedder fingerprint {manifest['fingerprint'][:12]}…, "
            f"the query embedder's is {expected_fingerprint[:12]}…: another checkpoint, other weights or other "
            "embedding settings such as pool_factor): use the model the index was built with, or rebuild the index",
        )
    if corpus_dir is not None:
        check_current(manifest, index_dir, corpus_dir, name, remedy)
    return manifest


def check_current(manifest: dict, index_dir: Path, corpus_dir, name: str, remedy: str) -> None:
    """Fail (reason "corpus") unless the index holds exactly the corpus's pages with the same images."""
    drift = corpus_drift(manifest["pages"], corpus_dir)
    if drift:
        raise StaleIndexError("corpus", f"{name} {index_dir} is stale for corpus {corpus_dir}: {drift}. {remedy}")


def load_shard(index_dir: Path, manifest: dict, shard_id: int, verify: bool, device: str) -> Shard:
    entry = manifest["shards"][shard_id]
    cfg = IndexConfig(**manifest["config"])
    for kind in ("vectors", "pages", "faiss"):
        if entry[kind] is None:
            continue
        path = index_dir / entry[kind]
        if not path.is_file():
            raise StaleIndexError("checksum", f"shard {shard_id}: file {path} is missing")
        if verify and sha256_file(path) != entry["sha256"][kind]:
            raise StaleIndexError(
                "checksum",
                f"shard {shard_id}: file {path} does not match the sha256 in the "
                "manifest (corrupted or modified): rebuild the index",
            )
    vectors = np.load(index_dir / entry["vectors"])
    table = np.load(index_dir / entry["pages"])
    lengths = table[:, 1]
    if (
        vectors.shape != (entry["n_tokens"], manifest["dim"])
        or len(table) != entry["n_pages"]
        or lengths.sum() != len(vectors)
    ):
        raise StaleIndexError("checksum", f"shard {shard_id}: array shapes disagree with the manifest")
    faiss_index = approx.load(index_dir / entry["faiss"], device) if entry["faiss"] else None
    return Shard(
        id=shard_id,
        vectors=torch.from_numpy(vectors).to(device),
        positions=table[:, 0].copy(),
        offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64),
        chunks=plan_chunks(lengths, cfg.chunk_tokens),
        faiss_index=faiss_index,
    )
