"""BM25: tokenizer, scores against the bm25s oracle, ranking and ties, save/load, validation, scale."""

import bm25s
import numpy as np
import pytest

from vrag_rl.retrieval.bm25 import ENGLISH_STOPWORDS, BM25Index, tokenize


def random_corpus(seed: int, n_docs: int, vocab: int = 40, max_len: int = 60):
    """Zipf-like word draws so some terms are in most pages (IDF near 0) and some in one page."""
    rng = np.random.default_rng(seed)
    words = [f"term{i}" for i in range(vocab)]
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    seps = [" ", ", ", ". ", "\n", " - "]
    texts = []
    for _ in range(n_docs):
        toks = rng.choice(words, size=int(rng.integers(0, max_len)), p=p)
        texts.append("".join(str(t) + seps[int(rng.integers(len(seps)))] for t in toks))
    queries = []
    for _ in range(20):
        q = list(rng.choice(words + ["unknownword"], size=int(rng.integers(1, 6))))
        if rng.random() < 0.3:
            q.append(q[0])  # a repeated query term counts twice, in both implementations
        queries.append(" ".join(str(t).upper() if rng.random() < 0.2 else str(t) for t in q))
    return [f"doc{i}" for i in range(n_docs)], texts, queries


def oracle_scores(texts, queries, k1, b):
    """bm25s' "lucene" method has our IDF and drops the constant (k1 + 1) factor we keep."""
    o = bm25s.BM25(k1=k1, b=b, method="lucene", dtype="float64")
    o.index([tokenize(t) for t in texts], show_progress=False)
    return np.stack([o.get_scores(tokenize(q)) * (k1 + 1) for q in queries])


def test_tokenizer_lowercases_unicode_words():
    assert tokenize("Hello, WORLD! Ünïcode_x 42 don't") == ["hello", "world", "ünïcode_x", "42", "don", "t"]
    assert tokenize("Δελτα, Москва; 東京") == ["δελτα", "москва", "東京"]
    assert tokenize("  ..,, ") == []
    assert tokenize("The cat of the house") == ["the", "cat", "of", "the", "house"]  # no stopwords by default
    assert tokenize("The cat of the house", ENGLISH_STOPWORDS) == ["cat", "house"]


@pytest.mark.parametrize("seed,k1,b", [(0, 1.2, 0.75), (1, 1.5, 0.3), (2, 0.9, 0.0), (3, 2.0, 1.0)])
def test_scores_match_bm25s_oracle(seed, k1, b):
    ids, texts, queries = random_corpus(seed, n_docs=60)
    texts[5] = ""  # an empty page
    ours = BM25Index(k1, b).build(ids, texts).scores(queries)
    np.testing.assert_allclose(ours, oracle_scores(texts, queries, k1, b), rtol=1e-12, atol=1e-12)
    assert ours.shape == (len(queries), len(ids)) and (ours[:, 5] == 0).all()


def test_search_is_sorted_prefix_of_scores_with_corpus_order_ties():
    ids, texts, queries = random_corpus(4, n_docs=80, vocab=8, max_len=6)  # short pages: many exact ties
    idx = BM25Index().build(ids, texts)
    scores = idx.scores(queries)
    n_tied_lists = 0
    for q, row, hits in zip(queries, scores, idx.search(queries, top_k=15)):
        expected = sorted((i for i in range(len(ids)) if row[i] > 0), key=lambda i: (-row[i], i))[:15]
        assert [p for p, _ in hits] == [ids[i] for i in expected], q
        assert [s for _, s in hits] == [float(row[i]) for i in expected]
        n_tied_lists += len({s for _, s in hits}) < len(hits)
    assert n_tied_lists > 0  # the corpus really exercised tie-breaking


def test_search_returns_only_matching_pages():
    idx = BM25Index().build(["a", "b", "c"], ["red apple", "green pear", "red red cherry"])
    assert [p for p, _ in idx.search(["red"], top_k=10)[0]] == ["c", "a"]
    assert idx.search(["blue", ""], top_k=3) == [[], []]
    (hits,) = idx.search(["pear apple cherry"], top_k=2)
    assert len(hits) == 2 and all(s > 0 for _, s in hits)


def test_duplicate_pages_tie_in_corpus_order():
    idx = BM25Index().build(["z_1", "a_1", "m_1"], ["same words here", "same words here", "other"])
    assert [p for p, _ in idx.search(["words"], 3)[0]] == ["z_1", "a_1"]


def test_stopwords_are_applied_to_pages_and_queries():
    idx = BM25Index(stopwords=ENGLISH_STOPWORDS).build(["a", "b"], ["the cat", "the dog"])
    assert idx.search(["the"], 5) == [[]]
    assert [p for p, _ in idx.search(["the dog"], 5)[0]] == ["b"]


def test_save_load_roundtrip(tmp_path):
    ids, texts, queries = random_corpus(5, n_docs=40)
    idx = BM25Index(1.4, 0.6, stopwords=["term0"]).build(ids, texts)
    path = idx.save(tmp_path / "bm25.npz")
    back = BM25Index.load(path)
    assert (back.k1, back.b, back.stopwords, back.page_ids) == (1.4, 0.6, frozenset({"term0"}), ids)
    np.testing.assert_array_equal(back.scores(queries), idx.scores(queries))
    assert back.search(queries, 7) == idx.search(queries, 7)
    assert [p.name for p in tmp_path.iterdir()] == ["bm25.npz"]  # no temporary file left behind
    BM25Index().build(ids, texts).save(tmp_path / "again.npz")
    assert (tmp_path / "again.npz").read_bytes() != path.read_bytes()  # different params are saved


def test_load_rejects_bad_files(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a BM25 index"):
        BM25Index.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a BM25 index"):
        BM25Index.load(other)
    idx = BM25Index().build(["a", "b"], ["x y", "y z"])
    good = idx.save(tmp_path / "good.npz")
    z = dict(np.load(good))
    z["doc_len"] = z["doc_len"] + 1
    np.savez(tmp_path / "bad.npz", **z)
    with pytest.raises(ValueError, match="inconsistent"):
        BM25Index.load(tmp_path / "bad.npz")
    z = dict(np.load(good))
    z["meta"] = np.array('{"format": "vrag_rl.bm25", "version": 99}')
    np.savez(tmp_path / "future.npz", **z)
    with pytest.raises(ValueError, match="unsupported"):
        BM25Index.load(tmp_path / "future.npz")


def test_validation():
    with pytest.raises(ValueError, match="k1"):
        BM25Index(k1=-1)
    with pytest.raises(ValueError, match="b must"):
        BM25Index(b=1.5)
    with pytest.raises(RuntimeError, match="empty"):
        BM25Index().search(["x"], 3)
    with pytest.raises(ValueError, match="2 page ids but 1 texts"):
        BM25Index().build(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="duplicate"):
        BM25Index().build(["a", "a"], ["x", "y"])
    idx = BM25Index().build(["a"], ["x"])
    with pytest.raises(ValueError, match="top_k"):
        idx.search(["x"], 0)
    with pytest.raises(TypeError, match="list of strings"):
        idx.search("x", 1)


def test_thousands_of_pages_rank_as_the_oracle_scores():
    rng = np.random.default_rng(7)
    words = np.array([f"w{i}" for i in range(20000)])
    texts = [" ".join(words[rng.integers(0, len(words), size=200)]) for _ in range(3000)]
    queries = [" ".join(rng.choice(words, size=12)) for _ in range(64)]
    hits = BM25Index().build([f"p{i}" for i in range(3000)], texts).search(queries, top_k=10)
    expected = oracle_scores(texts, queries, k1=1.2, b=0.75)
    for q, found in enumerate(hits):
        assert len(found) == 10
        scores = np.array([score for _, score in found])
        assert np.allclose(scores, np.sort(expected[q])[::-1][:10], rtol=1e-5), q
