"""PageEmbedder: padding dropped, batching invariant, pooling = colpali-engine's pooler, fingerprints."""

import dataclasses
import json
import shutil

import pytest
import torch
from PIL import Image

from vrag_rl.data.records import load_pages
from vrag_rl.retrieval.embed import EmbedderConfig, PageEmbedder, model_classes, model_fingerprint


@pytest.fixture(scope="module")
def images(bundled_corpus):
    """Two pages at one size and one at a smaller size, so a batch needs padding (halved: fewer tokens, faster)."""
    pages = load_pages(bundled_corpus)
    first, second = (Image.open(p.file).convert("RGB") for p in pages[:2])
    first, second = (im.resize((im.width // 2, im.height // 2)) for im in (first, second))
    small = second.resize((second.width // 2, second.height // 2))
    return [first, small, second]


def expected_tokens(processor, batch_fn, items) -> list[int]:
    """Token count of each item processed alone (no padding at all)."""
    return [int(batch_fn([x])["attention_mask"].sum()) for x in items]


def test_image_embeddings_drop_padding_and_match_solo(embedder, images):
    batched = embedder.embed_images(images)  # one left-padded batch of 3 (batch_size 4)
    counts = expected_tokens(embedder.processor, embedder.processor.process_images, images)
    assert [len(e) for e in batched] == counts
    assert counts[1] < counts[0]  # the small page really was padded in the batch
    for image, emb in zip(images, batched):
        assert emb.dtype == torch.float32 and emb.device.type == "cpu" and emb.shape[1] == embedder.dim
        assert torch.isfinite(emb).all()
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(emb)), atol=1e-4, rtol=0)
        solo = embedder.embed_images([image])[0]
        torch.testing.assert_close(emb, solo, atol=2e-4, rtol=0)


def test_query_embeddings_drop_padding_and_match_solo(embedder):
    queries = ["Who founded Lagas Dynamics?", "revenue", "In which city does the company run its main office?"]
    batched = embedder.embed_queries(queries)
    counts = expected_tokens(embedder.processor, embedder.processor.process_queries, queries)
    assert [len(e) for e in batched] == counts and len(set(counts)) == 3
    for q, emb in zip(queries, batched):
        assert torch.isfinite(emb).all()
        torch.testing.assert_close(emb, embedder.embed_queries([q])[0], atol=2e-4, rtol=0)


def test_batch_size_does_not_change_results(embedder_cfg, embedder, images):
    one = PageEmbedder(dataclasses.replace(embedder_cfg, batch_size=1))
    for a, b in zip(one.embed_images(images), embedder.embed_images(images)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


def test_pooling_is_colpali_hierarchical_pooling(embedder_cfg, embedder, images):
    from colpali_engine.compression import HierarchicalTokenPooler

    pooled_embedder = PageEmbedder(dataclasses.replace(embedder_cfg, pool_factor=3))
    pooled = pooled_embedder.embed_images(images)
    full = embedder.embed_images(images)
    oracle = HierarchicalTokenPooler().pool_embeddings(full, pool_factor=3)
    for p, f, o in zip(pooled, full, oracle):
        assert 1 <= len(p) <= len(f) // 3
        torch.testing.assert_close(p, o, atol=1e-4, rtol=0)
    # Queries are never pooled; the fingerprint records the pooling so indexes cannot be mixed up.
    q = "Who founded Lagas Dynamics?"
    torch.testing.assert_close(pooled_embedder.embed_queries([q])[0], embedder.embed_queries([q])[0])
    assert pooled_embedder.fingerprint != embedder.fingerprint


def test_fingerprint_follows_weights_and_config(tiny_dirs, tmp_path, embedder):
    src = tiny_dirs["retriever"]
    assert model_fingerprint(src, 1) == embedder.fingerprint  # stable, recomputable without the model
    copy = tmp_path / "retriever"
    shutil.copytree(src, copy)
    assert model_fingerprint(copy, 1) == embedder.fingerprint  # content, not path
    model_cls, _ = model_classes(copy)
    model = model_cls.from_pretrained(copy, dtype=torch.float32)
    with torch.no_grad():
        model.custom_text_proj.weight[0, 0] += 1e-3
    model.save_pretrained(copy)
    assert model_fingerprint(copy, 1) != embedder.fingerprint


def test_model_class_follows_model_type(tmp_path):
    from colpali_engine.models import ColQwen2, ColQwen2_5, ColQwen2_5_Processor, ColQwen2Processor

    for model_type, classes in (
        ("qwen2_vl", (ColQwen2, ColQwen2Processor)),
        ("qwen2_5_vl", (ColQwen2_5, ColQwen2_5_Processor)),
    ):
        d = tmp_path / model_type
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert model_classes(d) == classes
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a ColQwen2"):
        model_classes(bad)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="LoRA adapter"):
        model_classes(adapter)


def test_config_validation_and_dtypes():
    assert EmbedderConfig("m").torch_dtype == torch.float32  # auto on CPU
    assert EmbedderConfig("m", device="cuda").torch_dtype == torch.bfloat16  # auto on GPU
    for bad in (dict(dtype="fp8"), dict(batch_size=0), dict(pool_factor=0)):
        with pytest.raises(ValueError):
            EmbedderConfig("m", **bad)


def test_bad_queries(embedder):
    with pytest.raises(TypeError):
        embedder.embed_queries([b"bytes"])
