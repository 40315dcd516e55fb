"""DeepSpeed ZeRO (stage 2 or 3) for the policy trainer: the updates of the FSDP2 path through DeepSpeed's engine.

The engine runs with caller-owned gradient accumulation (``managed_gradient_accumulation: false``): each
micro-batch's backward reduces and partitions its gradients and ``step`` applies one update per mini-batch, as
on FSDP2. torch's AdamW is the client optimizer on both backends, so an update is the same math; DeepSpeed
clips to ``optim.grad_clip`` and skips a step whose global gradient norm is not finite, and a non-finite loss
on any rank drops the accumulated gradients without a step. Under stage 3 the reference policy is partitioned
by an engine of its own without an optimizer; under stage 2 (gradients and optimizer state partitioned, weights
whole) every rank holds it whole. ``offload`` moves optimizer state (and under stage 3 the weights) to host
memory. On CPU DeepSpeed's accelerator comes from ``DS_ACCELERATOR=cpu`` (the rank sets it before the import)
and its collectives run on the gloo group the rank has joined.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from vrag_rl.learner.backend import all_ranks
from vrag_rl.learner.config import TrainerConfig
from vrag_rl.learner.safe_load import weights_only_engine

TAG = "zero"  # the checkpoint's one tag: the step directory already says which step it is


def deepspeed_config(cfg: TrainerConfig, with_optimizer: bool = True) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload and with_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload and cfg.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": 1,  # micro-batches are planned by tokens; these two only satisfy checks
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, as on FSDP2
        "zero_force_ds_cpu_optimizer": False,  # offload with torch's AdamW, no compiled DeepSpeedCPUAdam
        "bf16": {"enabled": cfg.param_dtype == "bfloat16"},
        "fp16": {"enabled": cfg.param_dtype == "float16"},
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


class ZeroBackend:
    """The policy in a DeepSpeed engine on each rank of the process group."""

    def __init__(self, model, reference, cfg: TrainerConfig, make_optimizer: Callable):
        import deepspeed

        self.cfg = cfg
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=deepspeed_config(cfg))
        self.engine.checkpoint_engine = weights_only_engine(self.engine._config)  # loads run no code (safe_load)
        self.model = self.engine
        self.reference = reference
        if reference is not None and cfg.zero_stage == 3:
            self.reference, *_ = deepspeed.initialize(model=reference, config=deepspeed_config(cfg, False))

    def zero_grad(self) -> None:
        self.engine.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss already holds its share of the mini-batch

    def step(self, finite: bool) -> tuple[float, bool]:
        if not all_ranks(finite, True, self.cfg.device):
            self.zero_grad()
            return float("nan"), True
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm), not self.engine.was_step_applied()

    def _parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self.engine.module.named_parameters()

    def local_tensors(self) -> Iterator[torch.Tensor]:
        for _, p in self._parameters():
            yield p.ds_tensor if hasattr(p, "ds_tensor") else p  # stage 3: this rank's partition

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        for name, p in self._parameters():
            with GatheredParameters([p]):  # read-only gather under stage 3; nothing to do under stage 2
                full = p.detach().to("cpu", torch.float32, copy=True)
            yield name, full

    def save(self, path: Path) -> None:
        """Each rank's model and optimizer partitions (DeepSpeed's checkpoint format, one tag)."""
        self.engine.save_checkpoint(str(path), tag=TAG, save_latest=False)

    def load(self, path: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(
            str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {TAG!r}) under {path}")
