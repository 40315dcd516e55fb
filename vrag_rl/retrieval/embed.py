"""ColQwen2 / ColQwen2.5 multi-vector embeddings of page images, image queries and text queries.

The model and processor come from colpali-engine; the class follows the checkpoint's ``model_type``
(``qwen2_vl`` -> ColQwen2, ``qwen2_5_vl`` -> ColQwen2.5). Batches are left-padded and the padded
positions are dropped by the attention mask before anything else sees them (with SDPA a fully masked
row can come out NaN, and colpali-engine's own scorer treats padding as zero vectors, not as absent).
Optional hierarchical token pooling (colpali-engine's ``HierarchicalTokenPooler``) shrinks every page
to about ``n_tokens / pool_factor`` vectors. Query images are embedded exactly like pages.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from vrag_rl.data.records import sha256_file

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files whose content decides the embeddings: model config, weights, and the processor's resizing rules.
_CONFIG_FILES = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class EmbedderConfig:
    model_dir: str
    device: str = "cpu"
    dtype: str = "auto"  # "auto": float32 on CPU, bfloat16 on GPU; or one of float32 / bfloat16 / float16
    batch_size: int = 4  # images (or queries) per forward pass
    pool_factor: int = 1  # hierarchical token pooling of page/image embeddings; 1 = off

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.pool_factor < 1:
            raise ValueError(f"pool_factor must be >= 1, got {self.pool_factor}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if torch.device(self.device).type == "cpu" else torch.bfloat16
        return _DTYPES[self.dtype]


def model_classes(model_dir: str | Path):
    """(model class, processor class) of a ColQwen checkpoint, chosen from its config's ``model_type``."""
    from colpali_engine.models import ColQwen2, ColQwen2_5, ColQwen2_5_Processor, ColQwen2Processor

    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        hint = ""
        if (Path(model_dir) / "adapter_config.json").is_file():
            hint = " (this is a LoRA adapter: merge it into its base model first, or use a '-merged' checkpoint)"
        raise FileNotFoundError(f"no config.json in retriever model directory {model_dir}{hint}")
    model_type = json.loads(config_path.read_text()).get("model_type")
    classes = {"qwen2_vl": (ColQwen2, ColQwen2Processor), "qwen2_5_vl": (ColQwen2_5, ColQwen2_5_Processor)}
    if model_type not in classes:
        raise ValueError(f"{model_dir}: model_type {model_type!r} is not a ColQwen2 ({sorted(classes)})")
    return classes[model_type]


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Content hash, cached per (path, size, mtime): multi-GB weights are read once per process."""
    return sha256_file(path)


def weights_fingerprint(model_dir: str | Path, header: str) -> str:
    """sha256 over ``header`` (the embedding's kind and settings), the model's configs and its weights.

    Embeddings are only comparable between identical fingerprints. The compute dtype is left out on
    purpose: a bf16 GPU build and fp32 CPU queries of the same weights are meant to work together.
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    h.update(f"{header}\n".encode())
    for name in _CONFIG_FILES:
        path = model_dir / name
        if path.is_file():
            h.update(f"{name}\n".encode() + path.read_bytes())
    weights = sorted(p for p in model_dir.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    for path in weights:
        st = path.stat()
        h.update(f"{path.name}:{_file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)}\n".encode())
    return h.hexdigest()


def model_fingerprint(model_dir: str | Path, pool_factor: int) -> str:
    """The fingerprint of a ColQwen2 checkpoint's multi-vector embeddings at a token pooling factor."""
    return weights_fingerprint(model_dir, f"colqwen-multivector/pool_factor={pool_factor}")


class PageEmbedder:
    """ColQwen2 embeddings: one float32 CPU tensor (n_tokens, dim) per image or query, padding removed."""

    def __init__(self, cfg: EmbedderConfig):
        self.cfg = cfg
        model_cls, processor_cls = model_classes(cfg.model_dir)
        self.device = torch.device(cfg.device)
        self.model = model_cls.from_pretrained(cfg.model_dir, dtype=cfg.torch_dtype).to(self.device).eval()
        self.processor = processor_cls.from_pretrained(cfg.model_dir)
        self._pooler = None
        if cfg.pool_factor > 1:
            from colpali_engine.compression import HierarchicalTokenPooler

            self._pooler = HierarchicalTokenPooler()

    @property
    def dim(self) -> int:
        return self.model.dim

    @cached_property
    def fingerprint(self) -> str:
        return model_fingerprint(self.cfg.model_dir, self.cfg.pool_factor)

    @torch.inference_mode()
    def _forward(self, batch) -> list[Tensor]:
        batch = batch.to(self.device)
        out = self.model(**batch)  # (B, L, dim), L2-normalised rows; padded rows are zero or NaN
        mask = batch["attention_mask"].bool()
        return [row[m].float().cpu() for row, m in zip(out, mask)]

    def embed_images(self, images: Sequence[Image.Image], progress: bool = False) -> list[Tensor]:
        """Page (or query) images -> per image its token vectors, pooled when ``pool_factor`` > 1."""
        from vrag_rl.progress import progress_bar

        images = list(images)
        # Similar sizes share a batch, so little compute goes to padding; results return in input order.
        order = sorted(range(len(images)), key=lambda i: images[i].width * images[i].height)
        out: list[Tensor | None] = [None] * len(images)
        bs = self.cfg.batch_size
        for start in progress_bar(range(0, len(order), bs), desc="embed pages", unit="batch", disable=not progress):
            idx = order[start : start + bs]
            vectors = self._forward(self.processor.process_images([images[i].convert("RGB") for i in idx]))
            if self._pooler is not None:
                vectors = self._pooler.pool_embeddings(vectors, pool_factor=self.cfg.pool_factor)
            for i, v in zip(idx, vectors):
                out[i] = v.float().contiguous()
        return out  # type: ignore[return-value]

    def embed_queries(self, queries: Sequence[str]) -> list[Tensor]:
        """Text queries -> per query its token vectors (with colpali-engine's query augmentation tokens)."""
        queries = list(queries)
        if any(not isinstance(q, str) for q in queries):
            raise TypeError("queries must be strings")
        out: list[Tensor] = []
        for start in range(0, len(queries), self.cfg.batch_size):
            out.extend(self._forward(self.processor.process_queries(queries[start : start + self.cfg.batch_size])))
        return out
