"""Command-line options of the commands that run the agent (``eval``, ``serve``, ``watch``), in one place.

The corpus and its retriever, the policy (a local checkpoint on the vLLM engine, or an OpenAI-compatible
endpoint with a local processor for the chat template), and the agent's limits, with defaults that need
nothing but this repository: the bundled corpus, the tiny ColQwen2 and the warm tiny policy (built into the
cache on first use).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vrag_rl.agent.images import ImageBudget
from vrag_rl.data.paths import BUNDLED_CORPUS, cache_dir
from vrag_rl.job.warm import build_warm_policy
from vrag_rl.models.tiny import TINY_BUDGET, TinyConfig, build_tiny_models
from vrag_rl.retrieval.corpus_index import ensure_dense_index
from vrag_rl.retrieval.dense import DenseConfig
from vrag_rl.retrieval.types import SearchMode
from vrag_rl.rollout.agent_loop import AgentConfig
from vrag_rl.rollout.endpoint_engine import EndpointConfig
from vrag_rl.rollout.vllm_engine import VLLMConfig
from vrag_rl.rollout.worker import RolloutConfig


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", type=Path, default=BUNDLED_CORPUS, help="page corpus (default: the bundled one)")
    p.add_argument("--index", type=Path, default=None, help="its page index (default: built into the cache)")
    p.add_argument("--retriever-model", default=None, help="ColQwen2 directory (default: the tiny one)")
    p.add_argument("--dense-model", default=None, help="CLIP / SigLIP directory: a single-vector index beside ColQwen2")
    p.add_argument("--dense-index", type=Path, default=None, help="its index (default: built into the cache)")
    p.add_argument("--search-mode", default=SearchMode.VISUAL, choices=list(SearchMode))


def add_policy_args(p: argparse.ArgumentParser, endpoint: bool = True) -> None:
    p.add_argument("--policy", default=None, help="checkpoint directory (default: the warm tiny policy)")
    if endpoint:
        p.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL serving the policy instead")
        p.add_argument("--endpoint-model", default=None, help="the endpoint's model name")
        p.add_argument("--endpoint-key-env", default=None, help="environment variable holding the endpoint's key")
        p.add_argument("--processor", default=None, help="endpoint: processor whose chat template frames the turns")


def add_agent_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-turn-tokens", type=int, default=256)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, the paper's setting")
    p.add_argument("--min-pixels", type=int, default=TINY_BUDGET.min_pixels)
    p.add_argument("--max-pixels", type=int, default=TINY_BUDGET.max_pixels)
    p.add_argument("--crop-padding", type=float, default=0.0)


def fill_defaults(a: argparse.Namespace, needs_policy: bool = True) -> None:
    """The tiny retriever, the warm tiny policy and its processor wherever the options left them out."""
    endpoint = getattr(a, "endpoint", None)
    wants_policy = needs_policy and a.policy is None and not endpoint
    wants_processor = endpoint and not a.processor
    if a.retriever_model is None or wants_policy or wants_processor:
        tiny = build_tiny_models(cache_dir() / "tiny", TinyConfig(seed=0))
        a.retriever_model = a.retriever_model or str(tiny["retriever"])
        if wants_policy:
            a.policy = str(build_warm_policy(tiny["policy"], BUNDLED_CORPUS, cache_dir() / "warm"))
        if endpoint:
            a.processor = a.processor or str(tiny["policy"])


def dense_config(a: argparse.Namespace) -> DenseConfig | None:
    """The single-vector retriever of ``--dense-model``, its index built into the cache when none is given."""
    if a.dense_model is None:
        if a.search_mode == SearchMode.DENSE or a.dense_index is not None:
            raise SystemExit("--search-mode dense and --dense-index need --dense-model (a CLIP or SigLIP directory)")
        return None
    return ensure_dense_index(a.corpus, a.dense_index, a.dense_model)


def agent_config(a: argparse.Namespace) -> AgentConfig:
    return AgentConfig(
        max_turns=a.max_turns,
        max_length=a.max_length,
        search_mode=getattr(a, "search_mode", SearchMode.VISUAL),
        crop_padding=a.crop_padding,
        budget=ImageBudget(min_pixels=a.min_pixels, max_pixels=a.max_pixels),
    )


def rollout_config(a: argparse.Namespace, max_images: int, engine: str = "vllm") -> RolloutConfig:
    """The endpoint engine when ``--endpoint`` is given, else ``engine`` on the local policy (float32 on CPU)."""
    agent = agent_config(a)
    if getattr(a, "endpoint", None):
        endpoint = EndpointConfig(base_url=a.endpoint, model=a.endpoint_model or "", api_key_env=a.endpoint_key_env)
        return RolloutConfig(engine="endpoint", model_dir=a.processor or a.policy, agent=agent, endpoint=endpoint)
    vllm = VLLMConfig(
        dtype="float32",
        max_model_len=a.max_length,
        max_images=max_images,
        kv_cache_memory_bytes=256 << 20,
        enforce_eager=True,
    )
    return RolloutConfig(engine=engine, model_dir=a.policy, dtype="float32", vllm=vllm, agent=agent)
