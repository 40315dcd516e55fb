"""Tiny, random-weight models built offline and deterministically from a seed.

Every path of the framework runs on these on a 2-core CPU with no model hub: a byte-level BPE tokenizer
trained here with Qwen's special tokens and a Qwen2.5-VL style chat template, a Qwen2.5-VL processor, a
Qwen2.5-VL policy, a ColQwen2 retriever (colpali-engine) and single-vector CLIP and SigLIP retrievers
(``tiny_dense.py``), saved as ordinary directories that
transformers, colpali-engine and vLLM load like any hub checkpoint.

    python -m vrag_rl.models.tiny --out .cache/tiny --seed 0

Sizes respect vLLM's CPU attention (head size >= 32) and Qwen's mRoPE (sections sum to head_dim / 2).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vrag_rl.agent.images import ImageBudget
from vrag_rl.data.report_words import report_text
from vrag_rl.models.tiny_dense import DenseFamily, TinyDenseConfig, build_dense_model

# The tiny policy's processor takes images of 4..512 merged patches; its pages are shown small.
TINY_BUDGET = ImageBudget(min_pixels=64 * 28 * 28, max_pixels=256 * 28 * 28)
REPORT_DOCS = 300  # fictional reports in the tokenizer's training text
TOKENIZER_TEXT = 2  # part of the kit's stamp: bump when the tokenizer's training text changes

# Qwen2.5-VL's special tokens, in Qwen's order; they take the ids right after the learned vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2.5-VL chat format: ChatML turns, a default system turn, images as
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad to the image's token count).
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value | string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class TinyConfig:
    seed: int = 0
    vocab_size: int = 3000  # learned BPE vocabulary, special tokens come on top
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4  # head_dim 32: the smallest head size vLLM's CPU attention supports
    num_kv_heads: int = 2
    vision_hidden_size: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    retriever_hidden_size: int = 64
    retriever_heads: int = 2
    min_pixels: int = 4 * 28 * 28  # processor bounds; the agent's image budget must lie inside them
    max_pixels: int = 512 * 28 * 28
    max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError("hidden_size / num_heads must be a multiple of 4 (mRoPE sections)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError("need 0 < min_pixels <= max_pixels")


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (temporal, height, width) in Qwen2.5-VL's 1:1.5:1.5 ratio."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _training_text(seed: int) -> list[str]:
    """A deterministic corpus covering the protocol's tags, numbers and the English of prompts and documents:
    the synthetic reports' words become whole tokens and their made-up names a few syllable tokens each."""
    words = (
        "the of and to in is was for on that with as by at from it an be this are which or have has "
        "what when where who how many much year revenue profit table chart figure page report document "
        "company city product population growth total average percent million billion quarter annual "
        "search answer think bbox crop image region question information relevant retrieved zoom look "
        "reason step first then final need find according shows value highest lowest compared between "
        "you your previous action invalid please use format only one tag must assistant user system "
        "located headquarters founded employees sales market share price cost rate index level score"
    ).split()
    rng = random.Random(seed)
    lines = [
        "<think>I need to find the relevant page first.</think>\n<search>annual revenue table 2021</search>",
        "<think>The number is small; zoom in.</think>\n<bbox>[12, 340, 260, 410]</bbox>",
        "<think>The chart shows the answer.</think>\n<answer>42.5 million</answer>",
        "Your previous action is invalid. Please use <search>, <bbox> or <answer>.",
    ]
    for _ in range(4000):
        n = rng.randint(4, 16)
        sent = " ".join(rng.choice(words) for _ in range(n))
        num = f"{rng.randint(0, 9999)}" if rng.random() < 0.5 else f"{rng.uniform(0, 100):.1f}"
        tag = rng.choice(["think", "search", "answer"])
        lines.append(f"<{tag}>{sent.capitalize()} {num}.</{tag}>")
        box = [rng.randint(0, 900) for _ in range(4)]
        lines.append(f"<bbox>[{box[0]}, {box[1]}, {box[2]}, {box[3]}]</bbox>")
    return lines + report_text(seed, REPORT_DOCS)


@functools.lru_cache(maxsize=4)
def _trained_bpe(seed: int, vocab_size: int) -> str:
    """The trained byte-level BPE as JSON; cached, since training takes seconds and every kit needs two copies."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_training_text(seed), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok.to_str()


def build_tokenizer(cfg: TinyConfig):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe(cfg.seed, cfg.vocab_size)),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=cfg.max_position_embeddings,
        padding_side="left",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )


def build_processor(tokenizer, cfg: TinyConfig):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def build_policy(tokenizer, cfg: TinyConfig):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = _token_ids(tokenizer)
    head_dim = cfg.hidden_size // cfg.num_heads
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            max_window_layers=cfg.num_layers,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section(head_dim)},
            bos_token_id=ids["bos_token_id"],
            eos_token_id=ids["eos_token_id"],
            pad_token_id=ids["pad_token_id"],
        ),
        vision_config=dict(
            depth=cfg.vision_depth,
            hidden_size=cfg.vision_hidden_size,
            intermediate_size=2 * cfg.vision_hidden_size,
            num_heads=cfg.vision_heads,
            out_hidden_size=cfg.hidden_size,
            fullatt_block_indexes=[cfg.vision_depth - 1],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.generation_config.bos_token_id = ids["bos_token_id"]
    return model


def build_retriever(tokenizer, cfg: TinyConfig):
    from colpali_engine.models import ColQwen2
    from transformers import Qwen2VLConfig

    ids = _token_ids(tokenizer)
    head_dim = cfg.retriever_hidden_size // cfg.retriever_heads
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=cfg.retriever_hidden_size,
            intermediate_size=2 * cfg.retriever_hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.retriever_heads,
            num_key_value_heads=cfg.retriever_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            max_window_layers=cfg.num_layers,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section(head_dim)},
            bos_token_id=ids["bos_token_id"],
            eos_token_id=ids["eos_token_id"],
            pad_token_id=ids["pad_token_id"],
        ),
        vision_config=dict(
            depth=cfg.vision_depth,
            embed_dim=cfg.vision_hidden_size,
            hidden_size=cfg.retriever_hidden_size,
            num_heads=cfg.vision_heads,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )
    torch.manual_seed(cfg.seed + 1)
    return ColQwen2(config).eval()


def build_retriever_processor(tokenizer, cfg: TinyConfig):
    from colpali_engine.models import ColQwen2Processor
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    return ColQwen2Processor(
        image_processor=Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_models(out: str | Path, cfg: TinyConfig = TinyConfig()) -> dict[str, Path]:
    """Build and save the kit; returns {"policy", "retriever", "clip", "siglip"} -> directory. Reuses a complete
    kit of the same config."""
    out = Path(out)
    dirs = {name: out / name for name in ("policy", "retriever", *(f.value for f in DenseFamily))}
    stamp = out / "tiny_config.json"
    wanted = json.dumps({**asdict(cfg), "tokenizer_text": TOKENIZER_TEXT}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted and all((d / "config.json").exists() for d in dirs.values()):
        return dirs
    tokenizer = build_tokenizer(cfg)
    build_processor(tokenizer, cfg).save_pretrained(dirs["policy"])
    build_policy(tokenizer, cfg).save_pretrained(dirs["policy"])
    retriever_tokenizer = build_tokenizer(cfg)
    retriever_tokenizer.padding_side = "left"
    build_retriever_processor(retriever_tokenizer, cfg).save_pretrained(dirs["retriever"])
    build_retriever(retriever_tokenizer, cfg).save_pretrained(dirs["retriever"])
    for family in DenseFamily:
        build_dense_model(dirs[family], family, _trained_bpe(cfg.seed, cfg.vocab_size), TinyDenseConfig(cfg.seed))
    stamp.write_text(wanted)  # written last: its presence means the kit is complete
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".cache/tiny", help="output directory (one folder per model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dirs = build_tiny_models(args.out, TinyConfig(seed=args.seed))
    for name, path in dirs.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
