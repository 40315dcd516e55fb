"""What a trainer backend (FSDP2 in ``fsdp.py``, DeepSpeed ZeRO in ``zero.py``) gives the policy trainer.

The policy trainer owns what both share: loading, micro-batches, the losses, the learning-rate schedule over
the backend's torch optimizer, RNG state. A backend owns the sharding of the policy and its reference, the
backward pass, clipping and the optimizer step, the gathered weights and the model and optimizer checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist


class Backend(Protocol):
    model: torch.nn.Module  # what forwards of the policy run on
    reference: torch.nn.Module | None
    optimizer: torch.optim.Optimizer  # torch's AdamW: the schedule sets its learning rate

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, finite: bool) -> tuple[float, bool]:
        """Clip and apply the accumulated gradients: (global gradient norm, whether the update was skipped)."""
        ...

    def local_tensors(self) -> Iterator[torch.Tensor]:
        """This rank's part of every weight."""
        ...

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full fp32 tensor on CPU) per parameter; a collective that every rank iterates to the end."""
        ...

    def save(self, path: Path) -> None: ...

    def load(self, path: Path) -> None: ...


def all_ranks(flag: bool, sharded: bool, device: str) -> bool:
    """True when ``flag`` holds on every rank (a collective under a process group)."""
    if not sharded:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
