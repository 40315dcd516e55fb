"""Rollout engine on transformers ``generate``: slow and simple, the oracle the vLLM engine is checked against.

Requests run one at a time (no padding, so nothing about batching can change a result). Positions are the
model's own 3-D mRoPE index over the whole multi-turn sequence (``mm_token_type_ids`` tells ``generate``
where the images are), and log-probs come from the logits ``generate`` returns, divided by the sampling
temperature, vision placeholders excluded (``models.forward.VISION_TOKENS``): the same numbers a training
forward over the recorded trajectory gives.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vrag_rl.models.forward import banned_token_ids, policy_log_softmax
from vrag_rl.rollout.engine import Generation, GenerationRequest, RolloutEngine, SamplingConfig, max_new_tokens


class HFEngine(RolloutEngine):
    def __init__(
        self, model_dir: str, dtype: str = "float32", device: str = "cpu", stop_token_ids: list[int] | None = None
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = torch.device(device)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        tokenizer = AutoProcessor.from_pretrained(model_dir).tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.stop_token_ids = stop_token_ids or [
            tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
        ]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_token_ids[-1]
        self.banned = banned_token_ids(tokenizer)

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest], sampling: SamplingConfig) -> list[Generation]:
        return [self._one(r, sampling) for r in requests]

    def _one(self, request: GenerationRequest, sampling: SamplingConfig) -> Generation:
        ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == self.image_token_id).to(torch.int32),
        }
        if request.images:
            inputs["pixel_values"] = torch.cat(request.pixel_values).to(self.device, self.model.dtype)
            inputs["image_grid_thw"] = torch.tensor(request.image_grid_thw, dtype=torch.long, device=self.device)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        options = dict(do_sample=False)
        if not sampling.greedy:
            options = dict(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else 0,
            )
        out = self.model.generate(
            **inputs,
            **options,
            max_new_tokens=max_new_tokens(request, sampling),
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            suppress_tokens=self.banned,
            output_logits=True,
            return_dict_in_generate=True,
        )
        new = out.sequences[0, ids.shape[1] :].tolist()
        # generate stops the batch at the first stop token; nothing follows it for a batch of one.
        logits = torch.stack([step[0] for step in out.logits[: len(new)]])  # raw: before temperature and bans
        logprobs = policy_log_softmax(logits, sampling.logprob_temperature, self.banned)
        logprobs = logprobs.gather(-1, torch.tensor(new, device=logits.device)[:, None])
        finish = "stop" if new and new[-1] in self.stop_token_ids else "length"
        return Generation(new, logprobs[:, 0].tolist(), finish)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        params = self.model.state_dict(keep_vars=True)  # tied weights appear under every name
        loaded = 0
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"the policy has no parameter {name!r}")
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
            loaded += tensor.numel() * tensor.element_size()
        return loaded
