"""The trainer's settings (``trainer.*`` of the main job): ranks, backend, precision, attention, optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEDULES = ("constant", "cosine")
ATTENTION = ("sdpa", "eager", "flash_attention_2")  # transformers' attn_implementation names
BACKENDS = ("fsdp2", "deepspeed")


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
    backend: str = "fsdp2"  # fsdp2 | deepspeed (ZeRO): how ranks shard the policy
    zero_stage: int = 3  # DeepSpeed ZeRO stage, 2 (gradients and optimizer state) or 3 (weights too)
    spread: bool = False  # one rank per node where Ray can (multi-node CPU runs); else Ray packs them
    param_dtype: str = "float32"  # compute dtype (bfloat16 on GPUs and bf16 CPUs); master weights stay fp32
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (the GPU recipes: CUDA and flash-attn)
    gradient_checkpointing: bool = False
    offload: bool = False  # optimizer state and (FSDP2, ZeRO-3) parameters in host memory between uses
    freeze_vision: bool = False
    micro_batch_tokens: int = 8192  # padded tokens per forward
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.param_dtype not in DTYPES:
            raise ValueError(f"trainer.param_dtype must be one of {tuple(DTYPES)}, got {self.param_dtype!r}")
        if self.num_workers < 1 or self.micro_batch_tokens < 1:
            raise ValueError("trainer: num_workers >= 1 and micro_batch_tokens >= 1")
        if self.backend not in BACKENDS or self.zero_stage not in (2, 3):
            raise ValueError(f"trainer.backend must be one of {BACKENDS} and trainer.zero_stage 2 or 3")
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
