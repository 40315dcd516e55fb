"""One data-parallel rank of the policy being trained: a plain class (``learner/ranks.py`` is its Ray shell).

Inside a process group the model is sharded by the configured backend: FSDP2 (``learner/fsdp.py``) or DeepSpeed
ZeRO stage 2 or 3 (``learner/zero.py``), behind one interface (``learner/backend.py``); the updates are the same
math on both. Without a process group it is an ordinary single-process model, which is what unit tests and the
warm start use; a ``param_dtype`` below float32 then runs the forward under autocast (weights stay float32).

A sharded forward is a collective, so every rank runs the same number of micro-batches (``batch.plan_ranks``)
and the same modules in the same order: a micro-batch without images gets a 4-patch dummy image outside the
loss, so its forward runs the vision tower first, like any other. A micro-batch's loss is its sum divided by
the token count of the whole mini-batch (over all ranks); ``_step`` multiplies it by the world size, the one
place that knows gradients are averaged over ranks, so the accumulated gradient equals the whole mini-batch's
on one rank.

A non-finite loss or gradient norm on any rank skips the optimizer step on every rank (the ranks agree, so
their weights never diverge) and is reported as ``skipped_updates``; the weights stay as they were.
``weights_finite`` checks the weights themselves before they are synced or saved.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.algo.losses import kl_penalty, policy_loss
from vrag_rl.learner.backend import Backend, all_ranks
from vrag_rl.learner.batch import collate, forward_logprobs
from vrag_rl.learner.config import DTYPES, TrainerConfig, lr_factor
from vrag_rl.learner.fsdp import FsdpBackend
from vrag_rl.learner.payloads import Objective, RankShare


def check_attention(attn: str, device: str) -> None:
    """Flash-attention 2 needs CUDA and the flash-attn package: asked for without them, say so before loading."""
    if attn != "flash_attention_2":
        return
    if device != "cuda":
        raise ValueError("trainer.attn_implementation=flash_attention_2 runs on CUDA GPUs only; use sdpa on CPU")
    if importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "trainer.attn_implementation=flash_attention_2 needs the flash-attn package (`make env TARGET=gpu`); "
            "or set trainer.attn_implementation=sdpa"
        )


def _load(model_dir: str, device: str, attn: str):
    from transformers import AutoModelForImageTextToText

    check_attention(attn, device)
    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).to(
        device
    )


def _backend(model, reference, cfg: TrainerConfig, sharded: bool) -> Backend:
    def make_optimizer(params) -> torch.optim.AdamW:  # the same optimizer on both backends
        o = cfg.optim
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

    if sharded and cfg.backend == "deepspeed":
        if cfg.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        from vrag_rl.learner.zero import ZeroBackend

        return ZeroBackend(model, reference, cfg, make_optimizer)
    return FsdpBackend(model, reference, cfg, sharded, make_optimizer)


class PolicyTrainer:
    """The policy (and, for the KL term, a frozen reference) on one rank, with its optimizer and schedule."""

    def __init__(
        self,
        model_dir: str,
        cfg: TrainerConfig,
        objective: Objective,
        total_steps: int,
        token_ids: tuple[int, int, list[int]],
    ):
        """``token_ids``: the image placeholder, padding and banned placeholder ids (``for_model`` reads them)."""
        self.cfg, self.objective, self.total_steps = cfg, objective, total_steps
        self.image_token_id, self.pad_token_id, self.banned = token_ids
        self.sharded = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if self.sharded else 1
        torch.manual_seed(0)  # dropout (a model config may enable it) draws from here; checkpoints keep its state
        self.model = _load(model_dir, cfg.device, cfg.attn_implementation)
        if cfg.freeze_vision:
            self.model.model.visual.requires_grad_(False)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reference = None
        if objective.with_reference:
            reference = _load(model_dir, cfg.device, cfg.attn_implementation).eval().requires_grad_(False)
        config = self.model.config
        self.backend = _backend(self.model, reference, cfg, self.sharded)
        self.model, self.reference = self.backend.model, self.backend.reference
        o = cfg.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.backend.optimizer, lambda s: lr_factor(s, o, total_steps)
        )
        # 4 patches of zeros (one merged image token): the vision tower's part of every collective.
        patch = config.vision_config
        dim = patch.in_channels * patch.temporal_patch_size * patch.patch_size**2
        self._dummy_pixels = torch.zeros(4, dim)
        self._dummy_ids = [config.vision_start_token_id, self.image_token_id, config.vision_end_token_id]

    @classmethod
    def for_model(cls, model_dir: str, cfg: TrainerConfig, objective: Objective, total_steps: int) -> PolicyTrainer:
        """Token ids (image placeholder, padding, banned placeholders) from the model directory's tokenizer."""
        from transformers import AutoProcessor

        from vrag_rl.models.forward import banned_token_ids

        tokenizer = AutoProcessor.from_pretrained(model_dir).tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        token_ids = (tokenizer.convert_tokens_to_ids("<|image_pad|>"), pad, banned_token_ids(tokenizer))
        return cls(model_dir, cfg, objective, total_steps, token_ids)

    # ---- forward -------------------------------------------------------------------------------------------
    def _forward(self, model, batch: dict[str, torch.Tensor], temperature: float, with_entropy: bool):
        # A sharded backend casts to param_dtype itself; a plain model reaches it through autocast.
        dtype = DTYPES[self.cfg.param_dtype]
        with torch.autocast(self.cfg.device, dtype, enabled=not self.sharded and dtype != torch.float32):
            return forward_logprobs(model, batch, temperature, with_entropy, self.banned)

    def _batch(self, trajectories: list[Trajectory]) -> dict[str, torch.Tensor]:
        batch = collate(trajectories, self.image_token_id, self.pad_token_id)
        if self.sharded and "pixel_values" not in batch:
            batch = self._with_dummy_image(batch)
        return {k: v.to(self.cfg.device) for k, v in batch.items()}

    def _with_dummy_image(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch plus a dummy image right after the shortest row's last token, outside the loss.

        A sharded forward gathers each module's parameters as it reaches it, so every rank must run the vision
        tower at the same point of the forward: before the language model, as an image batch does. Nothing
        real attends to tokens after it (causal attention), and the response mask leaves them out of the loss.
        """
        row = int(batch["attention_mask"].sum(1).argmin())
        end = int(batch["attention_mask"][row].sum())
        widened = {k: torch.nn.functional.pad(v, (0, 3)) for k, v in batch.items() if v.dim() == 2}
        widened["input_ids"][:, -3:] = self.pad_token_id
        widened["input_ids"][row, end : end + 3] = torch.tensor(self._dummy_ids)
        widened["attention_mask"][row, end : end + 3] = 1
        widened["mm_token_type_ids"][row, end + 1] = 1
        widened["pixel_values"], widened["image_grid_thw"] = self._dummy_pixels, torch.tensor([[1, 2, 2]])
        return widened

    @torch.no_grad()
    def logprobs(self, share: RankShare, reference: bool = False) -> list[torch.Tensor | None]:
        """Per trajectory of the share, the log-probs of its response tokens (in order), from the policy or the
        reference, at the objective's temperature."""
        model = self.reference if reference else self.model
        if model is None:
            raise RuntimeError("this trainer was built without a reference policy (algo.kl_coef = 0)")
        model.eval()
        trajectories = share.batch.trajectories
        out: list[torch.Tensor | None] = [None] * len(trajectories)
        for indices, weight in share.plan:
            batch = self._batch([trajectories[i] for i in indices])
            logp = self._forward(model, batch, self.objective.temperature, with_entropy=False).float().cpu()
            if weight:
                for row, i in enumerate(indices):
                    out[i] = logp[row][batch["response_mask"][row].bool().cpu()]
        return out

    # ---- updates -------------------------------------------------------------------------------------------
    def _step(self, share: RankShare, loss_fn) -> dict[str, float]:
        """Accumulate ``loss_fn`` over the share's plan, clip, step. Returns summed metrics (the caller adds ranks).

        ``loss_fn`` gives a micro-batch's share of the mini-batch loss over all ranks; the data-parallel
        gradient average divides by the world size, which the scale here undoes."""
        self.model.train()
        self.backend.zero_grad()
        sums: dict[str, float] = {}
        finite = True
        for indices, weight in share.plan:
            batch = self._batch([share.batch.trajectories[i] for i in indices])
            loss, metrics = loss_fn(indices, batch)
            self.backend.backward(loss * weight * self.world_size)
            finite = finite and bool(torch.isfinite(loss))
            if weight:
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        norm, skip = self.backend.step(finite)
        # The caller sums ranks: each rank holds the global norm and the common decision.
        sums["grad_norm"] = norm / self.world_size
        sums["skipped_updates"] = float(skip) / self.world_size
        return sums

    def weights_finite(self) -> bool:
        """Every weight of the policy is finite, on every rank (a collective under a process group)."""
        local = all(bool(torch.isfinite(t).all()) for t in self.backend.local_tensors())
        return all_ranks(local, self.sharded, self.cfg.device)

    def _padded(self, values: list[torch.Tensor], indices: list[int], mask: torch.Tensor) -> torch.Tensor:
        """Per-trajectory values of a micro-batch's rows, laid out on its response positions."""
        out = torch.zeros(mask.shape, device=self.cfg.device)
        for row, i in enumerate(indices):
            out[row][mask[row]] = values[i].to(self.cfg.device)
        return out

    def grpo_update(self, share: RankShare) -> dict[str, float]:
        """One optimizer step on a mini-batch: PPO-clip GRPO loss, k-estimator KL to the reference, optional
        entropy bonus, as the objective sets them. ``share.batch.old_logprobs`` None: this forward's own,
        detached (an on-policy step: the weights that sampled are these)."""
        algo, data, num_tokens = self.objective.algo, share.batch, share.num_tokens
        if algo is None or data.advantages is None:
            raise ValueError("a GRPO update needs a trainer set up with algo settings and a batch with advantages")

        def loss_fn(indices, batch):
            mask = batch["response_mask"].bool()
            logp, entropy = self._forward(self.model, batch, self.objective.temperature, with_entropy=True)
            old = logp.detach() if data.old_logprobs is None else self._padded(data.old_logprobs, indices, mask)
            adv = torch.tensor([data.advantages[i] for i in indices], device=self.cfg.device)
            pg, m = policy_loss(
                logp,
                old,
                adv,
                mask,
                clip_low=algo.clip_low,
                clip_high=algo.clip_high,
                dual_clip_c=algo.dual_clip_c,
                agg="token-mean",
                global_count=num_tokens,
                weights=None if data.is_weights is None else self._padded(data.is_weights, indices, mask),
            )
            count, ent = mask.sum(), (entropy * mask).sum()
            loss = pg - algo.entropy_coef * ent / num_tokens if algo.entropy_coef else pg
            metrics = {
                "pg_loss": pg.detach(),
                "tokens": count,
                "pg_clipfrac": m["pg_clipfrac"] * count,
                "ppo_kl": m["ppo_kl"] * count,
                "entropy": ent.detach(),
            }
            if data.ref_logprobs is not None:
                ref = self._padded(data.ref_logprobs, indices, mask)
                kl = (kl_penalty(logp, ref, algo.kl_kind) * mask).sum()
                loss = loss + algo.kl_coef * kl / num_tokens
                metrics["kl"] = kl.detach()
            return loss, metrics

        return self._step(share, loss_fn)

    def sft_update(self, share: RankShare) -> dict[str, float]:
        """One optimizer step of masked next-token NLL over the response tokens (supervised warm start)."""

        def loss_fn(indices, batch):
            mask = batch["response_mask"]
            nll = -(self._forward(self.model, batch, 1.0, with_entropy=False) * mask).sum()
            return nll / share.num_tokens, {"nll": nll.detach(), "tokens": mask.sum()}

        return self._step(share, loss_fn)

    def end_step(self) -> float:
        """Advance the learning-rate schedule by one training step; returns the new learning rate."""
        self.scheduler.step()
        return self.scheduler.get_last_lr()[0]

    # ---- weights out ---------------------------------------------------------------------------------------
    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full fp32 tensor on CPU) per parameter, each once (tied weights: one name). Collective:
        every rank must iterate to the end."""
        return self.backend.full_parameters()

    def _rng_file(self, path: Path) -> Path:
        return path / f"rng-rank{dist.get_rank() if self.sharded else 0}.pt"

    def save(self, path: Path) -> None:
        """The backend's sharded model and optimizer state, this rank's RNG states and the schedule position."""
        self.backend.save(path)
        rng = {"cpu": torch.get_rng_state()}
        if self.cfg.device == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, self._rng_file(path))
        if not self.sharded or dist.get_rank() == 0:
            state = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
            (path / "scheduler.json").write_text(json.dumps(state))

    def load(self, path: Path) -> None:
        self.backend.load(path)
        rng = torch.load(self._rng_file(path), weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
        # The schedule is a function of the step (not saved); its position and base rates are.
        self.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()) | {"lr_lambdas": [None]})
