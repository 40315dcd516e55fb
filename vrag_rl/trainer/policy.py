"""One data-parallel rank of the policy being trained: a plain class (``trainer/actor.py`` is its Ray shell).

Inside a process group the model is sharded with FSDP2 (``fully_shard``: each vision block, each decoder layer,
then the root) over a 1-D mesh of all ranks, with bf16 compute when asked (master weights and gradient
reductions stay fp32), optional CPU offload of parameters and optimizer state, and activation checkpointing.
Without a process group it is an ordinary single-process model, which is what unit tests and the warm start use.

A sharded forward is a collective, so every rank runs the same number of micro-batches (``batch.plan_ranks``)
and the same modules in the same order: a micro-batch without images gets a 4-patch dummy image outside the
loss, so its forward runs the vision tower first, like any other. A micro-batch's loss is its sum divided by
the token count of the whole mini-batch (over all ranks); ``_step`` multiplies it by the world size, the one
place that knows gradients are averaged over ranks, so the accumulated gradient equals the whole mini-batch's
on one rank.

A non-finite loss or gradient norm on any rank skips the optimizer step on every rank (the ranks agree by
an all-reduce, so their weights never diverge) and is reported as ``skipped_updates``; the weights stay as
they were. ``weights_finite`` checks the weights themselves before they are synced or saved.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.algo.config import AlgoConfig
from vrag_rl.algo.losses import kl_penalty, policy_loss
from vrag_rl.trainer.batch import MicroBatch, collate, forward_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEDULES = ("constant", "cosine")
ATTENTION = ("sdpa", "eager", "flash_attention_2")  # transformers' attn_implementation names


@dataclass
class OptimConfig:
    lr: float = 1e-6
    warmup_steps: int = 5  # linear warm-up, then the schedule
    schedule: str = "constant"  # "constant" | "cosine" (to 0 at the last step)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.warmup_steps >= 0 and self.grad_clip > 0 and len(self.betas) == 2):
            raise ValueError("optim: lr > 0, warmup_steps >= 0, grad_clip > 0 and two betas")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass
class TrainerConfig:
    num_workers: int = 1  # data-parallel ranks (Ray actors)
    num_cpus: float = 1.0  # per rank
    num_gpus: float = 0.0  # per rank; > 0 means CUDA and nccl
    spread: bool = False  # one rank per node where Ray can (multi-node CPU runs); else Ray packs them
    param_dtype: str = "float32"  # compute dtype under FSDP2 (bfloat16 on GPUs); master weights stay fp32
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (the GPU recipes: CUDA and flash-attn)
    gradient_checkpointing: bool = False
    offload: bool = False  # parameters, gradients and optimizer state in host memory between uses
    freeze_vision: bool = False
    micro_batch_tokens: int = 8192  # padded tokens per forward
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.param_dtype not in DTYPES:
            raise ValueError(f"trainer.param_dtype must be one of {tuple(DTYPES)}, got {self.param_dtype!r}")
        if self.num_workers < 1 or self.micro_batch_tokens < 1:
            raise ValueError("trainer: num_workers >= 1 and micro_batch_tokens >= 1")
        if self.attn_implementation not in ATTENTION:
            raise ValueError(
                f"trainer.attn_implementation must be one of {ATTENTION}, got {self.attn_implementation!r}"
            )

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


def _shard(model, cfg: TrainerConfig) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(cfg.device, (dist.get_world_size(),))
    options = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=torch.float32),
        offload_policy=CPUOffloadPolicy() if cfg.offload else OffloadPolicy(),
    )
    for block in model.model.visual.blocks:
        fully_shard(block, **options)
    for layer in model.model.language_model.layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)


class PolicyTrainer:
    """The policy (and, for the KL term, a frozen reference) on one rank, with its optimizer and schedule."""

    def __init__(
        self,
        model_dir: str,
        cfg: TrainerConfig,
        total_steps: int,
        with_reference: bool,
        image_token_id: int,
        pad_token_id: int,
        banned: list[int],
    ):
        self.cfg, self.total_steps = cfg, total_steps
        self.image_token_id, self.pad_token_id, self.banned = image_token_id, pad_token_id, banned
        self.sharded = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if self.sharded else 1
        torch.manual_seed(0)  # dropout (a model config may enable it) draws from here; checkpoints keep its state
        self.model = _load(model_dir, cfg.device, cfg.attn_implementation)
        if cfg.freeze_vision:
            self.model.model.visual.requires_grad_(False)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reference = None
        if with_reference:
            self.reference = _load(model_dir, cfg.device, cfg.attn_implementation).eval().requires_grad_(False)
        if self.sharded:
            _shard(self.model, cfg)
            if self.reference is not None:
                _shard(self.reference, cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, o, total_steps))
        # 4 patches of zeros (one merged image token): the vision tower's part of every collective.
        patch = self.model.config.vision_config
        dim = patch.in_channels * patch.temporal_patch_size * patch.patch_size**2
        self._dummy_pixels = torch.zeros(4, dim)
        config = self.model.config
        self._dummy_ids = [config.vision_start_token_id, image_token_id, config.vision_end_token_id]

    @classmethod
    def for_model(cls, model_dir: str, cfg: TrainerConfig, total_steps: int, with_reference: bool) -> PolicyTrainer:
        """Token ids (image placeholder, padding, banned placeholders) from the model directory's tokenizer."""
        from transformers import AutoProcessor

        from vrag_rl.models.forward import banned_token_ids

        tokenizer = AutoProcessor.from_pretrained(model_dir).tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(
            model_dir,
            cfg,
            total_steps,
            with_reference,
            tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            pad,
            banned_token_ids(tokenizer),
        )

    # ---- forward -------------------------------------------------------------------------------------------
    def _forward(self, model, batch: dict[str, torch.Tensor], temperature: float, with_entropy: bool):
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
    def logprobs(
        self, trajectories: list[Trajectory], plan: list[MicroBatch], temperature: float, reference: bool = False
    ) -> list[torch.Tensor]:
        """Per trajectory, the log-probs of its response tokens (in order), from the policy or the reference."""
        model = self.reference if reference else self.model
        if model is None:
            raise RuntimeError("this trainer was built without a reference policy (algo.kl_coef = 0)")
        model.eval()
        out: list[torch.Tensor | None] = [None] * len(trajectories)
        for indices, weight in plan:
            batch = self._batch([trajectories[i] for i in indices])
            logp = self._forward(model, batch, temperature, with_entropy=False).float().cpu()
            if weight:
                for row, i in enumerate(indices):
                    out[i] = logp[row][batch["response_mask"][row].bool().cpu()]
        return out

    # ---- updates -------------------------------------------------------------------------------------------
    def _step(self, trajectories: list[Trajectory], plan: list[MicroBatch], loss_fn) -> dict[str, float]:
        """Accumulate ``loss_fn`` over the plan, clip, step. Returns summed metrics (the caller adds ranks).

        ``loss_fn`` gives a micro-batch's share of the mini-batch loss over all ranks; the data-parallel
        gradient average divides by the world size, which the scale here undoes."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        finite = True
        for indices, weight in plan:
            batch = self._batch([trajectories[i] for i in indices])
            loss, metrics = loss_fn(indices, batch)
            (loss * weight * self.world_size).backward()
            finite = finite and bool(torch.isfinite(loss))
            if weight:
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        skip = not self._all_ranks(finite and math.isfinite(norm))
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        # The caller sums ranks: each rank holds the global norm and the common decision.
        sums["grad_norm"] = norm / self.world_size
        sums["skipped_updates"] = float(skip) / self.world_size
        return sums

    def _all_ranks(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank (a collective under a process group)."""
        if not self.sharded:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.cfg.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def weights_finite(self) -> bool:
        """Every weight of the policy is finite, on every rank (a collective under a process group)."""
        local = all(
            bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in self.model.parameters()
        )
        return self._all_ranks(local)

    def grpo_update(
        self,
        trajectories: list[Trajectory],
        plan: list[MicroBatch],
        advantages: list[float],
        old_logprobs: list[torch.Tensor],
        algo: AlgoConfig,
        num_tokens: int,
        temperature: float,
        ref_logprobs: list[torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """One optimizer step on a mini-batch: PPO-clip GRPO loss, k-estimator KL to the reference, optional
        entropy bonus. ``num_tokens``: response tokens of the whole mini-batch over all ranks."""
        if algo.loss_agg != "token-mean":
            raise NotImplementedError("the distributed trainer aggregates by token-mean only")
        device = self.cfg.device

        def padded(values: list[torch.Tensor], indices, mask) -> torch.Tensor:
            out = torch.zeros(mask.shape, device=device)
            for row, i in enumerate(indices):
                out[row][mask[row]] = values[i].to(device)
            return out

        def loss_fn(indices, batch):
            mask = batch["response_mask"].bool()
            logp, entropy = self._forward(self.model, batch, temperature, with_entropy=True)
            adv = torch.tensor([advantages[i] for i in indices], device=device)
            pg, m = policy_loss(
                logp,
                padded(old_logprobs, indices, mask),
                adv,
                mask,
                algo.clip_low,
                algo.clip_high,
                algo.dual_clip_c,
                "token-mean",
                num_tokens,
            )
            count = mask.sum()
            loss = pg
            ent = (entropy * mask).sum()
            metrics = {
                "pg_loss": pg.detach(),
                "tokens": count,
                "pg_clipfrac": m["pg_clipfrac"] * count,
                "ppo_kl": m["ppo_kl"] * count,
                "entropy": ent.detach(),
            }
            if algo.entropy_coef:
                loss = loss - algo.entropy_coef * ent / num_tokens
            if ref_logprobs is not None:
                kl = (kl_penalty(logp, padded(ref_logprobs, indices, mask), algo.kl_kind) * mask).sum()
                loss = loss + algo.kl_coef * kl / num_tokens
                metrics["kl"] = kl.detach()
            return loss, metrics

        return self._step(trajectories, plan, loss_fn)

    def sft_update(self, trajectories: list[Trajectory], plan: list[MicroBatch], num_tokens: int) -> dict[str, float]:
        """One optimizer step of masked next-token NLL over the response tokens (supervised warm start)."""

        def loss_fn(indices, batch):
            mask = batch["response_mask"]
            nll = -(self._forward(self.model, batch, 1.0, with_entropy=False) * mask).sum()
            return nll / num_tokens, {"nll": nll.detach(), "tokens": mask.sum()}

        return self._step(trajectories, plan, loss_fn)

    def end_step(self) -> float:
        """Advance the learning-rate schedule by one training step; returns the new learning rate."""
        self.scheduler.step()
        return self.scheduler.get_last_lr()[0]

    # ---- weights out ---------------------------------------------------------------------------------------
    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full fp32 tensor on CPU) per parameter, each once (tied weights: one name). Collective:
        every rank must iterate to the end."""
        for name, p in self.model.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            yield name, full.detach().to("cpu", torch.float32)

    def _rng_file(self, path: Path) -> Path:
        return path / f"rng-rank{dist.get_rank() if self.sharded else 0}.pt"

    def save(self, path: Path) -> None:
        """Sharded model and optimizer state (torch.distributed.checkpoint), this rank's RNG states and the
        schedule position."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
        rng = {"cpu": torch.get_rng_state()}
        if self.cfg.device == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, self._rng_file(path))
        if not self.sharded or dist.get_rank() == 0:
            state = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
            (path / "scheduler.json").write_text(json.dumps(state))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = torch.load(self._rng_file(path), weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
        # The schedule is a function of the step (not saved); its position and base rates are.
        self.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()) | {"lr_lambdas": [None]})
