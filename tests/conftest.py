"""Session fixtures: the tiny model kit is built once and cached on disk across test sessions."""

import os
from pathlib import Path

import pytest

# Tests use local model directories only; no hub look-ups or usage reports leave the machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import vrag_rl  # noqa: F401  (installs the torchvision import hook before anything imports transformers)
from vrag_rl.models.tiny import TinyConfig, build_tiny_models

CACHE = Path(os.environ.get("VRAG_RL_CACHE", Path(__file__).resolve().parents[1] / ".cache"))


@pytest.fixture(scope="session")
def tiny_dirs() -> dict[str, Path]:
    return build_tiny_models(CACHE / "tiny", TinyConfig(seed=0))


@pytest.fixture(scope="session")
def tiny_processor(tiny_dirs):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dirs["policy"])


@pytest.fixture(scope="session")
def tiny_policy(tiny_dirs):
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_dirs["policy"], dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def bundled_corpus() -> Path:
    """The synthetic corpus shipped in data/: the demo's default and the tests' documents."""
    return Path(__file__).resolve().parents[1] / "data" / "synthetic-small"
