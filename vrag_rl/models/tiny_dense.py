"""Tiny random CLIP and SigLIP checkpoints: the single-vector image-text retriever of the tiny kit.

Both share the kit's trained byte-level BPE, wrapped as CLIP wraps its text (a start token before, an end
token after: CLIP pools the end token's state, SigLIP the last position of a ``max_length`` padded row).
Images are squared to ``image_size`` by each family's own image processor; both embed into ``hidden_size``
dimensions. Saved as ordinary checkpoint
directories that ``transformers.AutoModel`` and ``AutoProcessor`` load like the hub's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, processors

from vrag_rl.choice import Choice

BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


class DenseFamily(Choice):
    CLIP = "clip"
    SIGLIP = "siglip"


@dataclass(frozen=True)
class TinyDenseConfig:
    seed: int = 0
    hidden_size: int = 64
    layers: int = 2
    heads: int = 2
    image_size: int = 64
    patch_size: int = 16
    max_text_tokens: int = 32


def _tokenizer(bpe_json: str, max_text_tokens: int):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(bpe_json)
    ids = {t: tok.token_to_id(t) for t in (BOS, EOS)}
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=list(ids.items()))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=max_text_tokens
    )


def _towers(tokenizer, cfg: TinyDenseConfig) -> tuple[dict, dict]:
    common = dict(
        hidden_size=cfg.hidden_size,
        intermediate_size=2 * cfg.hidden_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
    )
    text = dict(
        common,
        vocab_size=len(tokenizer),
        max_position_embeddings=cfg.max_text_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return text, dict(common, image_size=cfg.image_size, patch_size=cfg.patch_size)


def build_dense_model(out: str | Path, family: str, bpe_json: str, cfg: TinyDenseConfig = TinyDenseConfig()) -> Path:
    """Write a random CLIP or SigLIP checkpoint (model, tokenizer, image processor) to ``out``."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
    )

    family = DenseFamily.parse(family, "family")
    tokenizer = _tokenizer(bpe_json, cfg.max_text_tokens)
    text, vision = _towers(tokenizer, cfg)
    torch.manual_seed(cfg.seed + 2)
    if family == DenseFamily.CLIP:
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.hidden_size))
        square = {"height": cfg.image_size, "width": cfg.image_size}
        images = CLIPImageProcessor(size={"shortest_edge": cfg.image_size}, crop_size=square)
        processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        images = SiglipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size})
        processor = SiglipProcessor(image_processor=images, tokenizer=tokenizer)
    out = Path(out)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out
