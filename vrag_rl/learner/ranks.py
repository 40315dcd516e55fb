"""The trainer on Ray: ``TrainerGroup`` drives the trainer ranks (``TrainerRank``, a thin shell over ``PolicyTrainer``).

The group plans micro-batches over ranks (``batch.split_over_ranks``), sends each rank its ``RankShare``, and
adds up what comes back. Ranks join one torch.distributed group (gloo on CPU, nccl on GPUs) at the address of
rank 0's node. Every call goes to all ranks at once, because each forward of a sharded model is a collective;
so does gathering the weights, of which rank 0 alone hands out buckets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.learner.batch import split_over_ranks
from vrag_rl.learner.config import TrainerConfig
from vrag_rl.learner.export import write_hf_checkpoint
from vrag_rl.learner.payloads import Batch, Objective, RankShare, WeightBucket, iter_buckets
from vrag_rl.learner.policy import PolicyTrainer
from vrag_rl.learner.trainer import GRPO_PER_TOKEN, SFT_PER_TOKEN, mean_metrics, merge_logprobs

log = logging.getLogger(__name__)


def interface_of(ip: str) -> str | None:
    """The network interface holding ``ip`` on this host, or None."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addresses):
            return name
    return None


class TrainerRank:
    """One rank: joins the process group, then holds a ``PolicyTrainer`` and answers for it."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.policy: PolicyTrainer | None = None
        self._buckets: Iterator[WeightBucket] | None = None

    def address(self) -> tuple[str, int]:
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(
        self, master: tuple[str, int], model_dir: str, cfg: TrainerConfig, objective: Objective, total_steps: int
    ) -> None:
        import ray
        import torch.distributed as dist

        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master[0], str(master[1])
        # torchrun's variables, which DeepSpeed reads; Ray shows each rank its own GPU as device 0
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if cfg.device != "cuda" and "GLOO_SOCKET_IFNAME" not in os.environ:
            # gloo binds to the address the host name resolves to, which may be loopback or nothing at all
            os.environ["GLOO_SOCKET_IFNAME"] = interface_of(ray.util.get_node_ip_address()) or "lo"
        if cfg.device == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", rank=self.rank, world_size=self.world_size)
        self.policy = PolicyTrainer.for_model(model_dir, cfg, objective, total_steps)
        self.model_dir = model_dir

    def logprobs(self, share: RankShare, reference: bool) -> list[torch.Tensor | None]:
        return self.policy.logprobs(share, reference)

    def grpo_update(self, share: RankShare) -> dict[str, float]:
        return self.policy.grpo_update(share)

    def sft_update(self, share: RankShare) -> dict[str, float]:
        return self.policy.sft_update(share)

    def end_step(self) -> float:
        return self.policy.end_step()

    def weights_finite(self) -> bool:
        return self.policy.weights_finite()

    def save(self, path: str) -> None:
        self.policy.save(Path(path))

    def load(self, path: str) -> None:
        self.policy.load(Path(path))

    def begin_weights(self, bucket_bytes: int) -> None:
        self._buckets = iter_buckets(self.policy.full_parameters(), bucket_bytes)

    def next_weights(self) -> tuple[WeightBucket | None, bool]:
        """(the next bucket on rank 0, None elsewhere; whether there was one). Every rank gathers each bucket."""
        bucket = next(self._buckets, None)
        if bucket is None:
            self._buckets = None
        return (bucket if self.rank == 0 else None), bucket is not None

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

    def __init__(self, cfg: TrainerConfig, model_dir: str, objective: Objective, total_steps: int):
        import ray

        self.cfg, self.world_size = cfg, cfg.num_workers
        placement = "SPREAD" if cfg.spread else "DEFAULT"
        remote = ray.remote(TrainerRank).options(
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, scheduling_strategy=placement
        )
        self.ranks = [remote.remote(r, cfg.num_workers) for r in range(cfg.num_workers)]
        addresses = ray.get([r.address.remote() for r in self.ranks])
        log.info("trainer ranks on %s; torch.distributed master %s:%d", [ip for ip, _ in addresses], *addresses[0])
        ray.get([r.setup.remote(addresses[0], model_dir, cfg, objective, total_steps) for r in self.ranks])

    def _shares(self, batch: Batch) -> list[RankShare]:
        return split_over_ranks(batch, self.world_size, self.cfg.micro_batch_tokens)

    def _on_all(self, method: str, *args) -> list:
        import ray

        return ray.get([getattr(r, method).remote(*args) for r in self.ranks])

    def _per_share(self, method: str, shares: list[RankShare], *args) -> list:
        import ray

        return ray.get([getattr(r, method).remote(s, *args) for r, s in zip(self.ranks, shares)])

    def logprobs(self, trajectories: list[Trajectory], reference: bool = False) -> list[torch.Tensor]:
        shares = self._shares(Batch(trajectories))
        return merge_logprobs(self._per_share("logprobs", shares, reference), shares)

    def grpo_update(self, batch: Batch) -> dict[str, float]:
        return mean_metrics(self._per_share("grpo_update", self._shares(batch)), GRPO_PER_TOKEN)

    def sft_update(self, trajectories: list[Trajectory]) -> dict[str, float]:
        return mean_metrics(self._per_share("sft_update", self._shares(Batch(trajectories))), SFT_PER_TOKEN)

    def end_step(self) -> float:
        return self._on_all("end_step")[0]

    def weights_finite(self) -> bool:
        return self._on_all("weights_finite")[0]

    def weight_buckets(self, bucket_bytes: int) -> Iterator:
        """Ray references to rank 0's buckets, one at a time: the bucket stays in the object store until the
        rollout engines have it, and never passes through the controller's memory."""
        import ray

        self._on_all("begin_weights", bucket_bytes)
        while True:
            pairs = [r.next_weights.options(num_returns=2).remote() for r in self.ranks]
            if not all(ray.get([more for _, more in pairs])):
                return
            yield pairs[0][0]

    def save(self, path: Path) -> None:
        self._on_all("save", str(path))

    def load(self, path: Path) -> None:
        self._on_all("load", str(path))

    def export(self, out_dir: Path, dtype: str) -> None:
        self._on_all("export", str(out_dir), dtype)

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Leave the process group, then end the ranks; a rank still inside a collective (a peer failed mid-step)
        never takes the call, so after ``timeout_s`` the ranks are ended regardless."""
        import ray

        ray.wait([r.shutdown.remote() for r in self.ranks], num_returns=len(self.ranks), timeout=timeout_s)
        for r in self.ranks:
            ray.kill(r)
