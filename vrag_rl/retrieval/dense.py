"""Single-vector image-text embeddings (CLIP and SigLIP families through transformers): one vector per page.

Any local checkpoint directory whose ``model_type`` is ``clip`` or ``siglip`` loads with ``AutoModel`` and
``AutoProcessor``. Pages and image queries go through ``get_image_features``, text queries through
``get_text_features``; every vector is L2-normalised, so inner product is the cosine both families were trained
on (CLIP scales it, SigLIP scales and shifts it: neither changes a ranking). Text is padded to the text tower's
full length, as SigLIP was trained (CLIP pools its end token and is unaffected), and truncated there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vrag_rl.retrieval.embed import EmbedderConfig, weights_fingerprint

FAMILIES = ("clip", "siglip")  # the model_type values this embedder reads


@dataclass(frozen=True)
class DenseConfig:
    """The single-vector retriever of a corpus: its model and the index built with it."""

    model_dir: str
    index_dir: str
    device: str = "cpu"
    dtype: str = "auto"  # as EmbedderConfig: float32 on CPU, bfloat16 on GPU
    batch_size: int = 16

    @property
    def torch_dtype(self) -> torch.dtype:
        return EmbedderConfig(self.model_dir, self.device, self.dtype, self.batch_size).torch_dtype  # its checks


def dense_family(model_dir: str | Path) -> str:
    """The checkpoint's ``model_type``, refused unless it is a CLIP or SigLIP image-text model."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in single-vector retriever directory {model_dir}")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{model_dir}: model_type {model_type!r} is not a single-vector image-text model {FAMILIES}")
    return model_type


def dense_fingerprint(model_dir: str | Path) -> str:
    """The fingerprint of a checkpoint's single-vector embeddings (no model is loaded)."""
    return weights_fingerprint(model_dir, f"{dense_family(model_dir)}-single-vector")


class DenseEmbedder:
    """L2-normalised float32 vectors (n, dim): one row per image or text query."""

    def __init__(self, cfg: DenseConfig):
        from transformers import AutoModel, AutoProcessor

        self.cfg = cfg
        self.family = dense_family(cfg.model_dir)
        self.device = torch.device(cfg.device)
        self.model = AutoModel.from_pretrained(cfg.model_dir, dtype=cfg.torch_dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(cfg.model_dir)
        self.text_length = self.model.config.text_config.max_position_embeddings

    @cached_property
    def dim(self) -> int:
        return int(self.embed_queries(["dimension"]).shape[1])

    @cached_property
    def fingerprint(self) -> str:
        return dense_fingerprint(self.cfg.model_dir)

    @staticmethod
    def _normalised(features) -> np.ndarray:
        vectors = features.pooler_output.float()
        return torch.nn.functional.normalize(vectors, dim=-1).cpu().numpy()

    def _batches(self, items: list) -> list[list]:
        return [items[i : i + self.cfg.batch_size] for i in range(0, len(items), self.cfg.batch_size)]

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = [np.zeros((0, self.dim), np.float32)]
        for group in self._batches(list(images)):
            batch = self.processor(images=[im.convert("RGB") for im in group], return_tensors="pt").to(self.device)
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
            out.append(self._normalised(self.model.get_image_features(**batch)))
        return np.concatenate(out)

    @torch.inference_mode()
    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        if isinstance(queries, str) or any(not isinstance(q, str) for q in queries):
            raise TypeError("queries must be a list of strings")
        out = []
        for group in self._batches(list(queries)):
            kw = dict(padding="max_length", truncation=True, max_length=self.text_length, return_tensors="pt")
            batch = self.processor(text=group, **kw).to(self.device)
            out.append(self._normalised(self.model.get_text_features(**batch)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
