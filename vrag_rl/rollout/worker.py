"""Rollout workers: an engine plus the agent loop in one process, and a pool of them on Ray.

``RolloutWorker`` is a plain class (usable in-process, with either engine); the pool runs it as Ray actors,
one engine each, spreads the tasks of a batch over them group by group (a GRPO group
stays on one worker, so its samples see the same weights and batch) and returns rollouts in task order.

Weight updates stream: the trainer hands out its weights one bucket of named tensors at a time (a dict, or
a Ray reference to one), the pool passes each bucket to every worker through the object store, and every
worker feeds it into a single running ``update_weights`` call (``WeightStream``), so neither side ever holds
a second full copy of the model.

Both are a ``RolloutBackend``: what the GRPO step needs of rollouts (sample them, take new weights). A worker runs
its calls in order, so a batch submitted before an update samples with the older weights; with ``rollout.partial``
the update runs on a thread of its own instead and goes into a running batch at its next turn boundary
(``turns.EngineGate``). Every turn records the version of the weights that sampled it.

A pool's worker that dies (or whose rollout runs past ``call_timeout_s``, and is then killed) is started again
by Ray with the weights it was created with; the pool waits until every worker answers and raises
``WorkersRestarted``, so that its caller streams the current weights in and runs the batch again (its seeds
make the second run sample what the first would have).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from vrag_rl.rollout.agent_loop import AgentConfig, AgentLoop
from vrag_rl.rollout.endpoint_engine import EndpointConfig
from vrag_rl.rollout.engine import RolloutEngine, SamplingConfig
from vrag_rl.rollout.records import Rollout, Task
from vrag_rl.rollout.vllm_engine import VLLMConfig

log = logging.getLogger(__name__)

ENGINES = ("vllm", "hf", "endpoint")
WEIGHT_TIMEOUT_S = 600.0  # for the engine to take a weight update (a running batch's turns to end, a bucket)


@dataclass(frozen=True)
class WeightSync:
    """One weight update of the rollout engines: how long it took and the bytes each engine loaded."""

    seconds: float
    bytes: int


class Pending(Protocol):
    """A batch of rollouts under way."""

    def result(self) -> list[Rollout]: ...


@dataclass
class Done:
    """A batch of rollouts sampled before its ``submit`` returned (in-process workers)."""

    rollouts: list[Rollout]

    def result(self) -> list[Rollout]:
        return self.rollouts


class RolloutBackend(Protocol):
    """Rollouts for a batch of tasks, and new weights for the engines behind them. Batches and weight updates
    take effect in the order they are given: a batch submitted before an update samples with the older weights."""

    def rollout(self, tasks: list[Task], sampling: SamplingConfig) -> list[Rollout]: ...

    def submit(self, tasks: list[Task], sampling: SamplingConfig) -> Pending: ...

    def update_weights(self, buckets: Iterable, version: int) -> WeightSync:
        """Load new weights given as buckets of named tensors (dicts, or Ray references to them), in one pass;
        ``version`` tags the turns they sample (``Rollout.versions``)."""
        ...


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm | hf | endpoint (an OpenAI-compatible server: evaluation and serving only)
    model_dir: str = ""  # a Hugging Face checkpoint directory (weights, processor, chat template); endpoint: processor
    dtype: str = "bfloat16"  # of the hf engine; vllm.dtype for vLLM
    device: str = "cpu"  # of the hf engine
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    endpoint: EndpointConfig | None = None  # engine "endpoint"
    agent: AgentConfig = field(default_factory=AgentConfig)
    num_workers: int = 1
    num_cpus: float = 1.0  # per worker actor
    num_gpus: float = 0.0  # per worker actor (1 on GPU clusters)
    spread: bool = False  # one worker per node where Ray can (multi-node CPU runs); else Ray packs them
    bucket_bytes: int = 256 << 20  # weight-update bucket size
    # A weight update goes into a running batch at its next turn boundary (EngineGate) instead of after it: the
    # batch's later turns sample with the new weights (Rollout.versions). Off: batches and updates in order.
    partial: bool = False
    call_timeout_s: float = 1800.0  # a batch of rollouts still running after this is taken for a hung worker
    restart_timeout_s: float = 600.0  # how long restarted workers may take to come back

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"rollout.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.num_workers < 1:
            raise ValueError(f"rollout.num_workers must be >= 1, got {self.num_workers}")
        if self.call_timeout_s <= 0 or self.restart_timeout_s <= 0:
            raise ValueError("rollout: call_timeout_s and restart_timeout_s > 0")
        if (self.engine == "endpoint") != (self.endpoint is not None):
            raise ValueError('rollout.endpoint is needed by engine "endpoint", and only by it')
        if self.engine == "vllm" and self.vllm.max_images < self.agent.max_turns:
            raise ValueError(
                f"vllm.max_images ({self.vllm.max_images}) must be >= agent.max_turns ({self.agent.max_turns}): "
                "every action turn can add an image"
            )


def make_engine(cfg: RolloutConfig) -> RolloutEngine:
    if cfg.engine == "vllm":
        from vrag_rl.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(cfg.model_dir, cfg.vllm)
    if cfg.engine == "endpoint":
        from vrag_rl.rollout.endpoint_engine import EndpointEngine

        return EndpointEngine(cfg.model_dir, cfg.endpoint)
    from vrag_rl.rollout.hf_engine import HFEngine

    return HFEngine(cfg.model_dir, cfg.dtype, cfg.device)


class WeightStream:
    """Feeds buckets, pushed one at a time, into one lazy ``engine.update_weights`` on a background thread."""

    def __init__(self, engine: RolloutEngine, timeout_s: float = WEIGHT_TIMEOUT_S):
        self._queue: queue.Queue = queue.Queue(maxsize=1)  # at most one bucket waits: bounded memory
        self.error: BaseException | None = None
        self.nbytes = 0
        self.timeout_s = timeout_s
        self._thread = threading.Thread(target=self._run, args=(engine,), daemon=True)
        self._thread.start()

    def _items(self):
        while (bucket := self._queue.get()) is not None:
            yield from bucket.items()

    def _run(self, engine: RolloutEngine) -> None:
        try:
            self.nbytes = engine.update_weights(self._items())
        except BaseException as err:  # surfaced to the caller by push/finish
            self.error = err

    def _put(self, item) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.error is not None or not self._thread.is_alive():
                raise RuntimeError("the weight update failed") from self.error
            try:
                return self._queue.put(item, timeout=0.1)
            except queue.Full:
                if time.monotonic() > deadline:
                    raise TimeoutError("the engine took no weights for too long") from None

    def push(self, bucket: dict[str, torch.Tensor]) -> None:
        self._put(bucket)

    def finish(self) -> int:
        self._put(None)
        self._thread.join()
        if self.error is not None:
            raise RuntimeError("the weight update failed") from self.error
        return self.nbytes


class RolloutWorker:
    """One engine and its agent loop. ``retriever``: a retriever object, or an actor handle plus corpus dir."""

    def __init__(self, cfg: RolloutConfig, retriever=None, retriever_actor=None, corpus_dir: str | None = None):
        from transformers import AutoProcessor

        from vrag_rl.agent.chat import ChatEncoder

        if (retriever is None) == (retriever_actor is None):
            raise ValueError("give either a retriever or a retriever actor handle (with its corpus_dir)")
        if retriever is None:
            from vrag_rl.retrieval.actor import RemoteRetriever

            retriever = RemoteRetriever(retriever_actor, corpus_dir)
        self.cfg = cfg
        self.engine = make_engine(cfg)
        self.encoder = ChatEncoder(AutoProcessor.from_pretrained(cfg.model_dir))
        self.loop = AgentLoop(self.engine, self.encoder, retriever, cfg.agent)
        self._stream: WeightStream | None = None

    def rollout(self, tasks: list[Task], sampling: SamplingConfig) -> list[Rollout]:
        return self.loop.run(tasks, sampling)

    def submit(self, tasks: list[Task], sampling: SamplingConfig) -> Done:
        return Done(self.rollout(tasks, sampling))

    def timings(self) -> dict[str, float]:
        """Seconds spent generating, searching and in total during the last ``rollout``."""
        return dict(self.loop.timings)

    def node_ip(self) -> str:
        """The address of the Ray node this worker runs on (as a Ray actor)."""
        import ray

        return ray.util.get_node_ip_address()

    def update_weights(self, buckets: Iterable[dict[str, torch.Tensor]], version: int) -> WeightSync:
        t0 = time.perf_counter()
        items = (item for bucket in buckets for item in bucket.items())
        nbytes = self.loop.update_weights(items, version, WEIGHT_TIMEOUT_S)
        return WeightSync(time.perf_counter() - t0, nbytes)

    def begin_weight_update(self) -> None:
        """Start a streamed update: the engine is held from here to ``finish_weight_update`` (a batch running on
        another thread pauses at its next turn boundary)."""
        if self._stream is not None:
            raise RuntimeError("a weight update is already under way")
        self.loop.gate.hold(WEIGHT_TIMEOUT_S)
        try:
            self._stream = WeightStream(self.engine, WEIGHT_TIMEOUT_S)
        except BaseException:
            self.loop.gate.release()
            raise

    def push_weights(self, bucket: dict[str, torch.Tensor]) -> int:
        """Queue one bucket for the running update; returns its bytes."""
        if self._stream is None:
            raise RuntimeError("begin_weight_update first")
        self._stream.push(bucket)
        return sum(t.numel() * t.element_size() for t in bucket.values())

    def finish_weight_update(self, version: int) -> int:
        stream, self._stream = self._stream, None
        if stream is None:
            raise RuntimeError("begin_weight_update first")
        try:
            nbytes = stream.finish()
            self.loop.version = version
        finally:
            self.loop.gate.release()
        return nbytes

    def close(self) -> None:
        self.engine.close()


def split_by_group(tasks: list[Task], parts: int) -> list[list[int]]:
    """Task indices in ``parts`` near-equal chunks of whole groups (a group is never split)."""
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault(t.group, []).append(i)
    chunks = np.array_split(np.arange(len(groups)), min(parts, max(1, len(groups))))
    order = list(groups.values())
    return [[i for g in chunk for i in order[g]] for chunk in chunks if len(chunk)]


def in_task_order(size: int, chunks: list[list[int]], results: list[list[Rollout]]) -> list[Rollout]:
    """The workers' rollouts (one list per chunk of ``split_by_group``) back in the order of the tasks."""
    out: list[Rollout | None] = [None] * size
    for chunk, rollouts in zip(chunks, results):
        for i, r in zip(chunk, rollouts):
            out[i] = r
    return out


class WorkersRestarted(RuntimeError):
    """Rollout workers died or hung and were started again: they hold their initial weights."""


class RolloutPool:
    """``num_workers`` rollout worker actors on the running Ray cluster (restarted by Ray when they die)."""

    def __init__(self, cfg: RolloutConfig, retriever_actor, corpus_dir: str):
        import ray

        # rollout.partial: weight updates run on a thread of their own, beside a running batch
        remote = ray.remote(concurrency_groups={"weights": 1})(RolloutWorker).options(
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            max_restarts=-1,
            scheduling_strategy="SPREAD" if cfg.spread else "DEFAULT",
        )
        corpus_dir = str(Path(corpus_dir).resolve())
        self.cfg = cfg
        self.workers = [
            remote.remote(cfg, retriever_actor=retriever_actor, corpus_dir=corpus_dir) for _ in range(cfg.num_workers)
        ]
        self._started = [w.node_ip.remote() for w in self.workers]
        self.partial = cfg.partial  # updates go into running batches at a turn boundary

    def ready(self) -> RolloutPool:
        """Wait for every engine to have started (start-up errors surface here); the engines start meanwhile."""
        import ray

        log.info("rollout workers on %s", ray.get(self._started))
        return self

    def rollout(self, tasks: list[Task], sampling: SamplingConfig) -> list[Rollout]:
        return self.submit(tasks, sampling).result()

    def submit(self, tasks: list[Task], sampling: SamplingConfig) -> PoolBatch:
        chunks = split_by_group(tasks, len(self.workers))
        refs = [w.rollout.remote([tasks[i] for i in c], sampling) for w, c in zip(self.workers, chunks)]
        return PoolBatch(self, len(tasks), chunks, refs)

    def _recover(self, refs: list, err: Exception) -> None:
        """After a death (Ray restarts the worker) or a hang (the busy workers are killed, and restarted): wait
        until every worker answers, then raise ``WorkersRestarted``."""
        import ray
        from ray.exceptions import GetTimeoutError

        if isinstance(err, GetTimeoutError):
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for worker, ref in zip(self.workers, refs):
                if ref not in done:
                    ray.kill(worker, no_restart=False)
        else:  # the living workers finish their part; the batch runs again whole
            ray.wait(refs, num_returns=len(refs), timeout=self.cfg.call_timeout_s)
        deadline = time.monotonic() + self.cfg.restart_timeout_s
        for worker in self.workers:
            while True:
                try:
                    ray.get(worker.timings.remote(), timeout=max(1.0, deadline - time.monotonic()))
                    break
                except Exception:  # noqa: BLE001 (restarting: try again until the deadline)
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"rollout workers did not come back within {self.cfg.restart_timeout_s}s"
                        ) from err
                    time.sleep(1.0)
        raise WorkersRestarted(f"rollout workers were restarted ({type(err).__name__}: {err})") from err

    def update_weights(self, buckets: Iterable, version: int) -> WeightSync:
        """Stream weight buckets (dicts of named tensors, or Ray references to them) to every worker, one at a
        time; returns seconds and bytes moved (per worker)."""
        import ray

        group = {"concurrency_group": "weights"} if self.partial else {}  # else: behind the batches submitted
        t0 = time.perf_counter()
        ray.get([w.begin_weight_update.options(**group).remote() for w in self.workers])
        sent = 0
        for bucket in buckets:
            ref = bucket if isinstance(bucket, ray.ObjectRef) else ray.put(bucket)
            sent += ray.get([w.push_weights.options(**group).remote(ref) for w in self.workers])[0]  # same bytes each
            del ref, bucket
        loaded = ray.get([w.finish_weight_update.options(**group).remote(version) for w in self.workers])
        if any(n != sent for n in loaded):
            raise RuntimeError(f"workers loaded {loaded} bytes of the {sent} sent")
        return WeightSync(time.perf_counter() - t0, sent)

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)


@dataclass
class PoolBatch:
    """A batch under way on a pool's workers: each worker runs its calls in order, so the batch samples with the
    weights of the last update streamed before it was submitted."""

    pool: RolloutPool
    size: int
    chunks: list[list[int]]
    refs: list

    def result(self) -> list[Rollout]:
        """The rollouts in task order; ``WorkersRestarted`` when workers died or hung (see the module docstring)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            results = ray.get(self.refs, timeout=self.pool.cfg.call_timeout_s)
        except (RayActorError, GetTimeoutError) as err:
            self.pool._recover(self.refs, err)
        return in_task_order(self.size, self.chunks, results)
