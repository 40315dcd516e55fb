"""Trainer ranks as Ray actors (``TrainerRank``, a shell over ``PolicyTrainer``) and the driver's handle on
all of them (``TrainerGroup``): it plans micro-batches over ranks, sends each rank its share, and adds up
what comes back.

Ranks join one torch.distributed group (gloo on CPU, nccl on GPUs) at the address of rank 0's node. Every
call goes to all ranks at once, because each forward of a sharded model is a collective.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.algo.config import AlgoConfig
from vrag_rl.trainer.batch import plan_ranks
from vrag_rl.trainer.export import write_hf_checkpoint
from vrag_rl.trainer.policy import PolicyTrainer, TrainerConfig


class TrainerRank:
    """One rank: joins the process group, then holds a ``PolicyTrainer``."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.trainer: PolicyTrainer | None = None

    def address(self) -> tuple[str, int]:
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(
        self, master: tuple[str, int], model_dir: str, cfg: TrainerConfig, total_steps: int, with_reference: bool
    ) -> None:
        import torch.distributed as dist

        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master[0], str(master[1])
        if cfg.device == "cuda":
            torch.cuda.set_device(0)  # Ray shows each rank its own GPU as device 0
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", rank=self.rank, world_size=self.world_size)
        self.trainer = PolicyTrainer.for_model(model_dir, cfg, total_steps, with_reference)
        self.model_dir = model_dir

    def call(self, method: str, *args, **kwargs):
        return getattr(self.trainer, method)(*args, **kwargs)

    def sync_weights(self, pool) -> dict[str, float] | None:
        """Rank 0 streams the gathered weights into the rollout pool; the others only take part in gathering."""
        if self.rank == 0:
            return pool.update_weights(self.trainer.full_parameters())
        for _ in self.trainer.full_parameters():
            pass
        return None

    def export(self, out_dir: str, dtype: str) -> None:
        named = self.trainer.full_parameters()
        if self.rank == 0:
            write_hf_checkpoint(named, self.model_dir, out_dir, dtype)
        else:
            for _ in named:
                pass

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _share(items: list, plan: list[tuple[list[int], float]]) -> tuple[list, list[tuple[list[int], float]], list[int]]:
    """A rank's own items (each once, in plan order), its plan re-indexed into them, and their global indices."""
    order: dict[int, int] = {}
    for indices, _ in plan:
        for i in indices:
            order.setdefault(i, len(order))
    glob = list(order)
    return [items[i] for i in glob], [([order[i] for i in ix], w) for ix, w in plan], glob


class TrainerGroup:
    """All trainer ranks of a run, driven from the controller."""

    def __init__(self, cfg: TrainerConfig, model_dir: str, total_steps: int, with_reference: bool):
        import ray

        self.cfg, self.world_size = cfg, cfg.num_workers
        remote = ray.remote(TrainerRank).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
        self.ranks = [remote.remote(r, cfg.num_workers) for r in range(cfg.num_workers)]
        master = ray.get(self.ranks[0].address.remote())
        ray.get([r.setup.remote(master, model_dir, cfg, total_steps, with_reference) for r in self.ranks])

    def _call_all(self, calls: list[tuple[str, tuple, dict]]) -> list:
        """Per rank, ``(method, args, kwargs)`` of its ``PolicyTrainer``; all at once, results in rank order."""
        import ray

        return ray.get([r.call.remote(m, *a, **k) for r, (m, a, k) in zip(self.ranks, calls)])

    def _scatter(self, method: str, trajectories: list[Trajectory], per_item: dict[str, list] | None = None, **kwargs):
        """Call ``method(trajectories, plan, **per_item shares, **kwargs)`` on every rank with its share."""
        plans = plan_ranks([len(t) for t in trajectories], self.world_size, self.cfg.micro_batch_tokens)
        calls, globs = [], []
        for plan in plans:
            mine, local_plan, glob = _share(trajectories, plan)
            extra = {k: [v[i] for i in glob] for k, v in (per_item or {}).items()}
            calls.append((method, (mine, local_plan), extra | kwargs))
            globs.append(glob)
        return self._call_all(calls), globs

    def logprobs(
        self, trajectories: list[Trajectory], temperature: float, reference: bool = False
    ) -> list[torch.Tensor]:
        results, globs = self._scatter("logprobs", trajectories, temperature=temperature, reference=reference)
        out: list[torch.Tensor | None] = [None] * len(trajectories)
        for values, glob in zip(results, globs):
            for i, v in zip(glob, values):
                if v is not None:
                    out[i] = v
        return out

    def grpo_update(
        self,
        trajectories: list[Trajectory],
        advantages: list[float],
        old: list[torch.Tensor],
        ref: list[torch.Tensor] | None,
        algo: AlgoConfig,
        temperature: float,
    ) -> dict[str, float]:
        tokens = sum(sum(t.response_mask) for t in trajectories)
        per_item = {"advantages": advantages, "old_logprobs": old} | ({"ref_logprobs": ref} if ref else {})
        results, _ = self._scatter(
            "grpo_update", trajectories, per_item, algo=algo, num_tokens=tokens, temperature=temperature
        )
        return _means(results, per_token=("pg_clipfrac", "ppo_kl", "entropy", "kl"))

    def sft_update(self, trajectories: list[Trajectory]) -> dict[str, float]:
        tokens = sum(sum(t.response_mask) for t in trajectories)
        results, _ = self._scatter("sft_update", trajectories, num_tokens=tokens)
        return _means(results, per_token=("nll",))

    def end_step(self) -> float:
        return self._call_all([("end_step", (), {})] * self.world_size)[0]

    def sync_weights(self, pool) -> dict[str, float]:
        import ray

        return ray.get([r.sync_weights.remote(pool) for r in self.ranks])[0]

    def save(self, path: Path) -> None:
        self._call_all([("save", (Path(path),), {})] * self.world_size)

    def load(self, path: Path) -> None:
        self._call_all([("load", (Path(path),), {})] * self.world_size)

    def export(self, out_dir: Path, dtype: str) -> None:
        import ray

        ray.get([r.export.remote(str(out_dir), dtype) for r in self.ranks])

    def shutdown(self) -> None:
        import ray

        ray.get([r.shutdown.remote() for r in self.ranks])
        for r in self.ranks:
            ray.kill(r)


class LocalTrainer(TrainerGroup):
    """``TrainerGroup``'s calls on one in-process ``PolicyTrainer``: no Ray, no process group (the cached warm
    start, benchmarks)."""

    def __init__(self, cfg: TrainerConfig, model_dir: str, total_steps: int, with_reference: bool):
        self.cfg, self.world_size, self.model_dir = cfg, 1, model_dir
        self.trainer = PolicyTrainer.for_model(model_dir, cfg, total_steps, with_reference)

    def _call_all(self, calls: list[tuple[str, tuple, dict]]) -> list:
        return [getattr(self.trainer, m)(*a, **k) for m, a, k in calls]

    def sync_weights(self, pool):
        """The weights into ``pool`` (a rollout pool, or one engine); returns what its ``update_weights`` does."""
        return pool.update_weights(self.trainer.full_parameters())

    def export(self, out_dir: Path, dtype: str, extra_files: dict[str, str] | None = None) -> None:
        write_hf_checkpoint(self.trainer.full_parameters(), self.model_dir, out_dir, dtype, extra_files=extra_files)

    def shutdown(self) -> None:
        pass


def _means(results: list[dict[str, float]], per_token: tuple[str, ...]) -> dict[str, float]:
    """Sum the ranks' metric sums; per-token sums become means over the mini-batch's tokens."""
    total: dict[str, float] = {}
    for r in results:
        for k, v in r.items():
            total[k] = total.get(k, 0.0) + v
    tokens = max(total.get("tokens", 0.0), 1.0)
    return {k: (v / tokens if k in per_token else v) for k, v in total.items()}
