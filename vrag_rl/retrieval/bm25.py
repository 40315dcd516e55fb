"""Okapi BM25 over page texts (OCR), with sparse matrix scoring.

Score of page d for query q (query terms counted with multiplicity, as Lucene and rank_bm25 do)::

    score(q, d) = sum_{t in q} idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

The IDF is Lucene's (also bm25s' "lucene" method): it is never negative, so a term found in most
pages still counts a little instead of pushing pages down (Robertson's original IDF goes negative
there, and rank_bm25 patches that with an epsilon floor). bm25s' "lucene" scores leave out the
constant factor (k1 + 1); ours keep it, as in the classic Okapi formula. Ranking is identical.

Tokenizer: lowercase, then maximal runs of Unicode word characters (``\\w+``: letters, digits and
underscore of any script); no stemming; stopwords are removed only when given.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import scipy.sparse as sp

FORMAT_VERSION = 1
_WORD = re.compile(r"\w+")

# A short English list for callers who want it; BM25Index uses no stopwords unless given some.
ENGLISH_STOPWORDS = frozenset(
    "a an and are as at be by did do does for from had has have how in is it its of on or that the "
    "their this to was were what when where which who whom why will with".split()
)


def tokenize(text: str, stopwords: Iterable[str] = ()) -> list[str]:
    stop = stopwords if isinstance(stopwords, (set, frozenset)) else set(stopwords)
    return [t for t in _WORD.findall(text.lower()) if t not in stop]


class BM25Index:
    """Build once over (page_id, text) pairs in corpus order; search batches of queries.

    The index keeps raw term frequencies (terms x pages, CSR) and document lengths; the BM25 weight
    matrix is derived from them, so saving stores only counts and the parameters.
    """

    def __init__(self, k1: float = 1.2, b: float = 0.75, stopwords: Iterable[str] = ()):
        if not k1 >= 0:
            raise ValueError(f"k1 must be >= 0, got {k1}")
        if not 0 <= b <= 1:
            raise ValueError(f"b must be in [0, 1], got {b}")
        self.k1, self.b = float(k1), float(b)
        self.stopwords = frozenset(stopwords)
        self.page_ids: list[str] = []
        self.vocab: dict[str, int] = {}
        self._tf: sp.csr_matrix | None = None  # (terms, pages) counts
        self._doc_len = np.zeros(0, dtype=np.int64)
        self._weights: sp.csr_matrix | None = None  # (terms, pages) BM25 term weights

    def __len__(self) -> int:
        return len(self.page_ids)

    def build(self, page_ids: list[str], texts: list[str]) -> BM25Index:
        if len(page_ids) != len(texts):
            raise ValueError(f"{len(page_ids)} page ids but {len(texts)} texts")
        dup = [p for p, n in Counter(page_ids).items() if n > 1]
        if dup:
            raise ValueError(f"duplicate page ids: {dup[:5]}")
        counts = [Counter(tokenize(t, self.stopwords)) for t in texts]
        # Sorted vocabulary: the same texts always give the same term ids, hence byte-identical saves.
        vocab = {t: i for i, t in enumerate(sorted(set().union(*counts)))}
        rows = [vocab[t] for c in counts for t in c]
        cols = [d for d, c in enumerate(counts) for _ in c]
        vals = [n for c in counts for n in c.values()]
        tf = sp.csr_matrix(
            (np.asarray(vals, dtype=np.float64), (np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64))),
            shape=(len(vocab), len(texts)),
        )
        self._set(list(page_ids), vocab, tf, np.asarray([sum(c.values()) for c in counts], dtype=np.int64))
        return self

    def _set(self, page_ids: list[str], vocab: dict[str, int], tf: sp.csr_matrix, doc_len: np.ndarray) -> None:
        self.page_ids, self.vocab, self._tf, self._doc_len = page_ids, vocab, tf, doc_len
        n = len(page_ids)
        df = np.diff(tf.indptr).astype(np.float64)  # pages per term: one stored entry per (term, page)
        idf = np.log1p((n - df + 0.5) / (df + 0.5))
        avgdl = doc_len.mean() if n and doc_len.sum() else 1.0  # all-empty corpus: every norm is (1 - b)
        norm = self.k1 * (1.0 - self.b + self.b * doc_len / avgdl)  # per page
        w = tf.tocoo()
        data = np.repeat(idf, np.diff(tf.indptr)) * w.data * (self.k1 + 1.0) / (w.data + norm[w.col])
        self._weights = sp.csr_matrix((data, (w.row, w.col)), shape=tf.shape)
        self._weights.sort_indices()

    def _require_built(self) -> sp.csr_matrix:
        if self._weights is None:
            raise RuntimeError("BM25Index is empty: call build() or BM25Index.load() first")
        return self._weights

    def scores(self, queries: list[str]) -> np.ndarray:
        """Dense (num_queries, num_pages) float64 BM25 scores, pages in corpus order."""
        weights = self._require_built()
        rows, cols, vals = [], [], []
        for i, q in enumerate(queries):
            for t, n in Counter(tokenize(q, self.stopwords)).items():
                if t in self.vocab:  # unknown terms match nothing
                    rows.append(i)
                    cols.append(self.vocab[t])
                    vals.append(float(n))
        qm = sp.csr_matrix((vals, (rows, cols)), shape=(len(queries), len(self.vocab)), dtype=np.float64)
        return np.asarray((qm @ weights).todense())

    def search(self, queries: list[str], top_k: int) -> list[list[tuple[str, float]]]:
        """Per query, up to ``top_k`` (page_id, score) by descending score, ties in corpus order.

        Only pages sharing at least one term with the query are returned (every such page has a
        positive score), so a list can be shorter than ``top_k`` and is empty for a query with no
        known term: a page with score 0 carries no text evidence and would only add noise to fusion.
        """
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings, not a string")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        out = []
        for row in self.scores(queries):
            hit = np.flatnonzero(row > 0)
            # lexsort: last key is primary. Descending score, then ascending corpus position.
            best = hit[np.lexsort((hit, -row[hit]))][:top_k]
            out.append([(self.page_ids[i], float(row[i])) for i in best])
        return out

    def save(self, path: str | Path) -> Path:
        """One compressed ``.npz`` (no pickled objects), written atomically."""
        self._require_built()
        path = Path(path)
        meta = {"format": "vrag_rl.bm25", "version": FORMAT_VERSION, "k1": self.k1, "b": self.b}
        terms = sorted(self.vocab, key=self.vocab.__getitem__)
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            meta=np.array(json.dumps(meta)),
            page_ids=np.array(self.page_ids, dtype=str),
            terms=np.array(terms, dtype=str),
            stopwords=np.array(sorted(self.stopwords), dtype=str),
            tf_data=self._tf.data.astype(np.int64),
            tf_indices=self._tf.indices.astype(np.int64),
            tf_indptr=self._tf.indptr.astype(np.int64),
            doc_len=self._doc_len,
        )
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> BM25Index:
        path = Path(path)
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(str(z["meta"]))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path} is not a BM25 index saved by BM25Index.save: {e}") from e
        if meta.get("format") != "vrag_rl.bm25" or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported BM25 index format {meta.get('format')!r} v{meta.get('version')}")
        idx = cls(meta["k1"], meta["b"], [str(s) for s in z["stopwords"]])
        terms = [str(t) for t in z["terms"]]
        page_ids = [str(p) for p in z["page_ids"]]
        tf = sp.csr_matrix(
            (z["tf_data"].astype(np.float64), z["tf_indices"], z["tf_indptr"]), shape=(len(terms), len(page_ids))
        )
        doc_len = z["doc_len"]
        if len(doc_len) != len(page_ids) or not np.array_equal(np.asarray(tf.sum(axis=0)).ravel(), doc_len):
            raise ValueError(f"{path}: inconsistent BM25 index (term counts do not add up to page lengths)")
        idx._set(page_ids, {t: i for i, t in enumerate(terms)}, tf, doc_len)
        return idx
