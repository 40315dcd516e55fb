"""The trainer as the controller sees it (``Trainer``), and its two implementations.

``TrainerGroup`` drives the Ray trainer ranks (``TrainerRank``, a thin shell over ``PolicyTrainer``): it plans
micro-batches over ranks (``batch.split_over_ranks``), sends each rank its share through the rank's own remote
methods, and adds up what comes back. Ranks join one torch.distributed group (gloo on CPU, nccl on GPUs) at
the address of rank 0's node. Every call goes to all ranks at once, because each forward of a sharded model
is a collective.

``LocalTrainer`` is the same interface over one in-process ``PolicyTrainer``: no Ray, no process group (the
cached warm start, the in-process GRPO step test, benchmarks).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import torch

from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.algo.config import AlgoConfig
from vrag_rl.rollout.worker import RolloutBackend, WeightSync
from vrag_rl.trainer.batch import MicroBatch, RankShare, split_over_ranks
from vrag_rl.trainer.export import write_hf_checkpoint
from vrag_rl.trainer.policy import PolicyTrainer
from vrag_rl.trainer.settings import TrainerConfig

log = logging.getLogger(__name__)

GRPO_PER_TOKEN = ("pg_clipfrac", "ppo_kl", "entropy", "kl")  # metrics summed per token, reported as means
SFT_PER_TOKEN = ("nll",)


class Trainer(Protocol):
    """What the GRPO controller and the SFT loop need of a trainer, however many ranks it has."""

    def logprobs(
        self, trajectories: list[Trajectory], temperature: float, reference: bool = False
    ) -> list[torch.Tensor]: ...

    def grpo_update(
        self,
        trajectories: list[Trajectory],
        advantages: list[float],
        old: list[torch.Tensor] | None,
        ref: list[torch.Tensor] | None,
        algo: AlgoConfig,
        temperature: float,
    ) -> dict[str, float]:
        """``old``: None takes the update's own forward (an on-policy step, ``algo.old_logprobs=update``)."""
        ...

    def sft_update(self, trajectories: list[Trajectory]) -> dict[str, float]: ...

    def end_step(self) -> float: ...

    def weights_finite(self) -> bool: ...

    def sync_weights(self, rollouts: RolloutBackend) -> WeightSync: ...

    def save(self, path: Path) -> None: ...

    def load(self, path: Path) -> None: ...

    def export(self, out_dir: Path, dtype: str) -> None: ...

    def shutdown(self) -> None: ...


class SkipGuard:
    """Stops a run whose optimizer updates keep being skipped (non-finite loss or gradients): ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def record(self, skipped: bool, where: str) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"{self.in_a_row} optimizer updates in a row had a non-finite loss or gradient norm (last at {where}) "
                "and were skipped: stopping. Lower the learning rate or look for NaN in the inputs."
            )


def response_tokens(trajectories: list[Trajectory]) -> int:
    return sum(sum(t.response_mask) for t in trajectories)


def merge_logprobs(results: list[list[torch.Tensor | None]], shares: list[RankShare]) -> list[torch.Tensor]:
    """Per trajectory of the whole batch, the log-probs its rank computed (fillers come back as None)."""
    out: list[torch.Tensor | None] = [None] * sum(len(s.indices) for s in shares)
    for values, share in zip(results, shares):
        for i, v in zip(share.indices, values):
            if v is not None:
                out[i] = v
    return out


def mean_metrics(results: list[dict[str, float]], per_token: tuple[str, ...]) -> dict[str, float]:
    """Sum the ranks' metric sums; per-token sums become means over the mini-batch's tokens."""
    total: dict[str, float] = {}
    for r in results:
        for k, v in r.items():
            total[k] = total.get(k, 0.0) + v
    tokens = max(total.get("tokens", 0.0), 1.0)
    return {k: (v / tokens if k in per_token else v) for k, v in total.items()}


class TrainerRank:
    """One rank: joins the process group, then holds a ``PolicyTrainer`` and answers for it."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.policy: PolicyTrainer | None = None

    def address(self) -> tuple[str, int]:
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(
        self, master: tuple[str, int], model_dir: str, cfg: TrainerConfig, total_steps: int, with_reference: bool
    ) -> None:
        import ray
        import torch.distributed as dist

        from vrag_rl.trainer.cluster import interface_of

        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master[0], str(master[1])
        # torchrun's variables, which DeepSpeed reads; Ray shows each rank its own GPU as device 0
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if cfg.device != "cuda" and "GLOO_SOCKET_IFNAME" not in os.environ:
            # gloo binds to the address the host name resolves to, which may be loopback or nothing at all
            os.environ["GLOO_SOCKET_IFNAME"] = interface_of(ray.util.get_node_ip_address()) or "lo"
        if cfg.device == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", rank=self.rank, world_size=self.world_size)
        self.policy = PolicyTrainer.for_model(model_dir, cfg, total_steps, with_reference)
        self.model_dir = model_dir

    def logprobs(self, trajectories: list[Trajectory], plan: list[MicroBatch], temperature: float, reference: bool):
        return self.policy.logprobs(trajectories, plan, temperature, reference)

    def grpo_update(
        self,
        trajectories: list[Trajectory],
        plan: list[MicroBatch],
        advantages: list[float],
        old: list[torch.Tensor] | None,
        ref: list[torch.Tensor] | None,
        algo: AlgoConfig,
        num_tokens: int,
        temperature: float,
    ) -> dict[str, float]:
        return self.policy.grpo_update(trajectories, plan, advantages, old, algo, num_tokens, temperature, ref)

    def sft_update(self, trajectories: list[Trajectory], plan: list[MicroBatch], num_tokens: int) -> dict[str, float]:
        return self.policy.sft_update(trajectories, plan, num_tokens)

    def end_step(self) -> float:
        return self.policy.end_step()

    def weights_finite(self) -> bool:
        return self.policy.weights_finite()

    def save(self, path: str) -> None:
        self.policy.save(Path(path))

    def load(self, path: str) -> None:
        self.policy.load(Path(path))

    def sync_weights(self, rollouts: RolloutBackend) -> WeightSync | None:
        """Rank 0 streams the gathered weights into the rollouts; the others only take part in gathering."""
        if self.rank == 0:
            return rollouts.update_weights(self.policy.full_parameters())
        for _ in self.policy.full_parameters():
            pass
        return None

    def export(self, out_dir: str, dtype: str) -> None:
        named = self.policy.full_parameters()
        if self.rank == 0:
            write_hf_checkpoint(named, self.model_dir, out_dir, dtype)
        else:
            for _ in named:
                pass

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class TrainerGroup:
    """All trainer ranks of a run (Ray actors), driven from the controller."""

    def __init__(self, cfg: TrainerConfig, model_dir: str, total_steps: int, with_reference: bool):
        import ray

        self.cfg, self.world_size = cfg, cfg.num_workers
        placement = "SPREAD" if cfg.spread else "DEFAULT"
        remote = ray.remote(TrainerRank).options(
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, scheduling_strategy=placement
        )
        self.ranks = [remote.remote(r, cfg.num_workers) for r in range(cfg.num_workers)]
        addresses = ray.get([r.address.remote() for r in self.ranks])
        log.info("trainer ranks on %s; torch.distributed master %s:%d", [ip for ip, _ in addresses], *addresses[0])
        ray.get([r.setup.remote(addresses[0], model_dir, cfg, total_steps, with_reference) for r in self.ranks])

    def _shares(self, trajectories: list[Trajectory]) -> list[RankShare]:
        return split_over_ranks(trajectories, self.world_size, self.cfg.micro_batch_tokens)

    def logprobs(self, trajectories: list[Trajectory], temperature: float, reference: bool = False):
        import ray

        shares = self._shares(trajectories)
        calls = [r.logprobs.remote(s.trajectories, s.plan, temperature, reference) for r, s in zip(self.ranks, shares)]
        return merge_logprobs(ray.get(calls), shares)

    def grpo_update(
        self,
        trajectories: list[Trajectory],
        advantages: list[float],
        old: list[torch.Tensor] | None,
        ref: list[torch.Tensor] | None,
        algo: AlgoConfig,
        temperature: float,
    ) -> dict[str, float]:
        import ray

        tokens = response_tokens(trajectories)
        calls = [
            r.grpo_update.remote(
                s.trajectories,
                s.plan,
                s.take(advantages),
                s.take(old) if old else None,
                s.take(ref) if ref else None,
                algo,
                tokens,
                temperature,
            )
            for r, s in zip(self.ranks, self._shares(trajectories))
        ]
        return mean_metrics(ray.get(calls), GRPO_PER_TOKEN)

    def sft_update(self, trajectories: list[Trajectory]) -> dict[str, float]:
        import ray

        tokens = response_tokens(trajectories)
        calls = [
            r.sft_update.remote(s.trajectories, s.plan, tokens) for r, s in zip(self.ranks, self._shares(trajectories))
        ]
        return mean_metrics(ray.get(calls), SFT_PER_TOKEN)

    def end_step(self) -> float:
        import ray

        return ray.get([r.end_step.remote() for r in self.ranks])[0]

    def weights_finite(self) -> bool:
        import ray

        return ray.get([r.weights_finite.remote() for r in self.ranks])[0]

    def sync_weights(self, rollouts: RolloutBackend) -> WeightSync:
        import ray

        return ray.get([r.sync_weights.remote(rollouts) for r in self.ranks])[0]

    def save(self, path: Path) -> None:
        import ray

        ray.get([r.save.remote(str(path)) for r in self.ranks])

    def load(self, path: Path) -> None:
        import ray

        ray.get([r.load.remote(str(path)) for r in self.ranks])

    def export(self, out_dir: Path, dtype: str) -> None:
        import ray

        ray.get([r.export.remote(str(out_dir), dtype) for r in self.ranks])

    def shutdown(self) -> None:
        import ray

        ray.get([r.shutdown.remote() for r in self.ranks])
        for r in self.ranks:
            ray.kill(r)


class LocalTrainer:
    """The ``Trainer`` interface over one in-process ``PolicyTrainer`` (``policy``)."""

    def __init__(self, cfg: TrainerConfig, model_dir: str, total_steps: int, with_reference: bool):
        self.cfg, self.model_dir = cfg, model_dir
        self.policy = PolicyTrainer.for_model(model_dir, cfg, total_steps, with_reference)

    def _share(self, trajectories: list[Trajectory]) -> RankShare:
        return split_over_ranks(trajectories, 1, self.cfg.micro_batch_tokens)[0]

    def logprobs(self, trajectories: list[Trajectory], temperature: float, reference: bool = False):
        share = self._share(trajectories)
        return merge_logprobs([self.policy.logprobs(share.trajectories, share.plan, temperature, reference)], [share])

    def grpo_update(
        self,
        trajectories: list[Trajectory],
        advantages: list[float],
        old: list[torch.Tensor] | None,
        ref: list[torch.Tensor] | None,
        algo: AlgoConfig,
        temperature: float,
    ) -> dict[str, float]:
        s = self._share(trajectories)
        metrics = self.policy.grpo_update(
            s.trajectories,
            s.plan,
            s.take(advantages),
            s.take(old) if old else None,
            algo,
            response_tokens(trajectories),
            temperature,
            s.take(ref) if ref else None,
        )
        return mean_metrics([metrics], GRPO_PER_TOKEN)

    def sft_update(self, trajectories: list[Trajectory]) -> dict[str, float]:
        s = self._share(trajectories)
        metrics = self.policy.sft_update(s.trajectories, s.plan, response_tokens(trajectories))
        return mean_metrics([metrics], SFT_PER_TOKEN)

    def end_step(self) -> float:
        return self.policy.end_step()

    def weights_finite(self) -> bool:
        return self.policy.weights_finite()

    def sync_weights(self, rollouts: RolloutBackend) -> WeightSync:
        return rollouts.update_weights(self.policy.full_parameters())

    def save(self, path: Path) -> None:
        self.policy.save(Path(path))

    def load(self, path: Path) -> None:
        self.policy.load(Path(path))

    def export(self, out_dir: Path, dtype: str, extra_files: dict[str, str] | None = None) -> None:
        write_hf_checkpoint(self.policy.full_parameters(), self.model_dir, out_dir, dtype, extra_files=extra_files)

    def shutdown(self) -> None:
        """Nothing to stop: the model goes with this object."""
