"""Hugging Face checkpoints from trained weights: safetensors shards, config, processor and chat template.

The trainer's parameter names are the model's checkpoint names, so the gathered ``(name, tensor)`` pairs are
written as they are (tied output heads are not parameters of their own and come back from the config's
``tie_word_embeddings`` on load). Everything but the weights (config, tokenizer, processor, chat template,
generation config) is copied from the directory training started from, with the config's dtype set to the
exported one. The result loads in transformers (``from_pretrained``) and serves with vLLM (``vllm serve DIR``).
Written beside the target and renamed into place, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from vrag_rl.learner.config import DTYPES

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def write_hf_checkpoint(
    named: Iterable[tuple[str, torch.Tensor]],
    source_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    max_shard_size: str = "5GB",
    extra_files: dict[str, str] | None = None,
) -> Path:
    """``extra_files``: name -> text, written into the checkpoint too (before it appears under ``out_dir``)."""
    from huggingface_hub import save_torch_state_dict

    if dtype not in DTYPES:
        raise ValueError(f"export dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    state = {name: t.detach().to("cpu", DTYPES[dtype]).contiguous() for name, t in named}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in source_dir.iterdir():
            if f.is_file() and f.name not in WEIGHT_FILES and not f.name.startswith("model-"):
                shutil.copy2(f, tmp / f.name)
        config = json.loads((tmp / "config.json").read_text())
        for node in (config, config.get("text_config", {}), config.get("vision_config", {})):
            for key in ("dtype", "torch_dtype"):
                if key in node:
                    node[key] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
