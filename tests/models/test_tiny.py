"""The tiny model kit: deterministic, offline, and loadable by transformers, colpali-engine and vLLM."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vrag_rl.models.tiny import SPECIAL_TOKENS, TinyConfig, build_tiny_models, mrope_section
from vrag_rl.rollout.vllm_engine import collapse_runs


def test_build_is_deterministic(tmp_path, tiny_dirs):
    again = build_tiny_models(tmp_path / "a", TinyConfig(seed=0))
    other = build_tiny_models(tmp_path / "b", TinyConfig(seed=1))
    for name in ("policy", "retriever"):
        assert (again[name] / "tokenizer.json").read_text() == (tiny_dirs[name] / "tokenizer.json").read_text()
        ref = load_file(tiny_dirs[name] / "model.safetensors")
        same = load_file(again[name] / "model.safetensors")
        diff = load_file(other[name] / "model.safetensors")
        assert ref.keys() == same.keys()
        assert all(torch.equal(ref[k], same[k]) for k in ref)
        assert any(not torch.equal(ref[k], diff[k]) for k in ref if ref[k].numel() > 1)


def test_build_reuses_a_complete_kit(tmp_path):
    dirs = build_tiny_models(tmp_path, TinyConfig(seed=0))
    weights = dirs["policy"] / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    build_tiny_models(tmp_path, TinyConfig(seed=0))
    assert weights.stat().st_mtime_ns == mtime
    build_tiny_models(tmp_path, TinyConfig(seed=3))  # another config rebuilds
    assert weights.stat().st_mtime_ns != mtime


def test_config_validation():
    with pytest.raises(ValueError):
        TinyConfig(hidden_size=100, num_heads=4)
    with pytest.raises(ValueError):
        TinyConfig(min_pixels=10, max_pixels=5)
    assert sum(mrope_section(32)) == 16 and sum(mrope_section(128)) == 64


def test_tokenizer_knows_the_reports_words(tiny_processor, bundled_corpus):
    # The questions' words are whole tokens and a made-up company name a few syllables, as with a real
    # tokenizer: copying a name into a search is a few tokens, not a dozen characters.
    from vrag_rl.data.records import load_qa

    tok = tiny_processor.tokenizer
    qa = load_qa(bundled_corpus)
    for word in ("According", " revenue", " research", " Dynamics", " Motors", " chart", " founded"):
        assert len(tok.tokenize(word)) == 1, word
    assert max(len(tok.tokenize(" " + q.entity)) for q in qa) <= 6
    words = sum(len(q.question.split()) for q in qa)
    assert sum(len(tok.tokenize(q.question)) for q in qa) < 1.5 * words


def test_tokenizer_and_chat_template(tiny_processor):
    tok = tiny_processor.tokenizer
    ids = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert len(set(ids)) == len(SPECIAL_TOKENS) and min(ids) >= TinyConfig().vocab_size - 1000
    for text in ["<think>Revenue rose 12.5%.</think>\n<search>annual report 2021</search>", "naïve 東京 🚀 \t x"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<search>q</search>"}]},
        {"role": "user", "content": [{"type": "image"}]},
    ]
    rendered = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
        "<|im_start|>assistant\n<search>q</search><|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    )


def test_policy_and_retriever_load_and_run(tiny_dirs, tiny_processor, tiny_policy):
    from colpali_engine.models import ColQwen2, ColQwen2Processor

    cfg = json.loads((tiny_dirs["policy"] / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    image = Image.new("RGB", (112, 84), (200, 30, 30))
    text = tiny_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    enc = tiny_processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = tiny_policy.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4

    retriever = ColQwen2.from_pretrained(tiny_dirs["retriever"], dtype=torch.float32).eval()
    rproc = ColQwen2Processor.from_pretrained(tiny_dirs["retriever"])
    page_batch = rproc.process_images([image])
    query_batch = rproc.process_queries(["red page", "blue chart"])
    with torch.no_grad():
        pages = retriever(**page_batch)
        queries = retriever(**query_batch)
    assert pages.shape[-1] == queries.shape[-1] == 128
    # left-padding positions are fully masked and come out NaN: callers drop them by the attention mask
    pages = [e[m.bool()] for e, m in zip(pages, page_batch["attention_mask"])]
    queries = [e[m.bool()] for e, m in zip(queries, query_batch["attention_mask"])]
    assert all(torch.isfinite(e).all() for e in pages + queries)
    scores = rproc.score_multi_vector(queries, pages)
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


VLLM_GREEDY = """
import json, sys
from PIL import Image
from vllm import LLM, SamplingParams
model_dir, prompt_ids = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=1024,
          kv_cache_memory_bytes=32 << 20, limit_mm_per_prompt={"image": 1}, seed=0)
image = Image.new("RGB", (112, 84), (20, 200, 30))
out = llm.generate({"prompt_token_ids": prompt_ids, "multi_modal_data": {"image": image}},
                   SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
print("IDS", json.dumps(list(out[0].outputs[0].token_ids)))
print("PROMPT", json.dumps(list(out[0].prompt_token_ids)))
"""


@pytest.mark.slow  # vLLM in a subprocess
def test_vllm_loads_policy_and_matches_hf_greedy(tiny_dirs, tiny_processor, tiny_policy):
    """vLLM's CPU engine loads the kit's policy directory and reproduces HF greedy decoding with an image.

    The engine runs in its own interpreter, as rollout workers will: vLLM 0.32 scans every loaded module
    at engine start and trips over llvmlite's lazily-wrapping library object once numba (pulled in by
    other test oracles) has been imported into the same process.
    """
    image = Image.new("RGB", (112, 84), (20, 200, 30))
    text = tiny_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    enc = tiny_processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        hf = tiny_policy.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1] :]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # in-process engine: seconds, not tens
    # vLLM expands each image's placeholder itself: the prompt goes in with one <|image_pad|> per image.
    prompt = collapse_runs(
        enc["input_ids"][0].tolist(), tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    )
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_GREEDY, str(tiny_dirs["policy"]), json.dumps(prompt)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    ids = json.loads(next(line for line in lines if line.startswith("IDS "))[4:])
    assert json.loads(next(line for line in lines if line.startswith("PROMPT "))[7:]) == enc["input_ids"][0].tolist()
    assert ids == hf.tolist()
