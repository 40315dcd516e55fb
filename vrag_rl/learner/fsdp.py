"""FSDP2 for the policy trainer, and the plain single-process model (FSDP2's path without a process group).

Inside a process group the model is sharded with ``fully_shard`` (each vision block, each decoder layer, then
the root) over a 1-D mesh of all ranks, with bf16 compute when asked (master weights and gradient reductions
stay fp32) and optional CPU offload of parameters, gradients and optimizer state. Gradients are clipped with
torch's ``clip_grad_norm_`` over the sharded parameters (the norm is global), and a non-finite loss or norm on
any rank skips the optimizer step on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from vrag_rl.learner.backend import all_ranks
from vrag_rl.learner.config import DTYPES, TrainerConfig


def shard(model, cfg: TrainerConfig) -> None:
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


class FsdpBackend:
    """The policy (and its reference) sharded with FSDP2 when ``sharded``, else as loaded."""

    def __init__(self, model, reference, cfg: TrainerConfig, sharded: bool, make_optimizer: Callable):
        self.cfg, self.sharded = cfg, sharded
        if sharded:
            shard(model, cfg)
            if reference is not None:
                shard(reference, cfg)
        self.model, self.reference = model, reference
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, finite: bool) -> tuple[float, bool]:
        """Clip and step unless the loss (``finite`` on this rank) or the norm is not finite on some rank."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        skip = not all_ranks(finite and math.isfinite(norm), self.sharded, self.cfg.device)
        if skip:
            self.zero_grad()
        else:
            self.optimizer.step()
        return norm, skip

    def local_tensors(self) -> Iterator[torch.Tensor]:
        for p in self.model.parameters():
            yield p.to_local() if hasattr(p, "to_local") else p

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.model.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            yield name, full.detach().to("cpu", torch.float32)

    def save(self, path: Path) -> None:
        """Sharded model and optimizer state (torch.distributed.checkpoint)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        """What ``save`` wrote, read without running code from it (``safe_load``)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from vrag_rl.learner.safe_load import MetadataReader, ValuesPlanner

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, storage_reader=MetadataReader(str(path)), planner=ValuesPlanner())
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
