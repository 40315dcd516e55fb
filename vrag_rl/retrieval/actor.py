"""The retriever on Ray: index shards spread over actors, one front that embeds once and merges top-k.

Topology: each ``ShardActor`` loads a contiguous group of the index's shards
(``MultiVectorIndex.load(dir, shards=[...])``). ``DistributedRetriever`` embeds a batch of queries once,
puts the embeddings in the object store, asks every shard actor for its local top-k and merges them by
score with ties broken by index order — the rule of ``MultiVectorIndex.search`` itself, so the
in-process ``LocalRetriever`` and this one give the same lists. ``start_retriever_actor`` runs that front
as an actor too, for callers (rollout workers) that should share one retriever instead of each loading the
model; ``RemoteRetriever`` is that actor's handle seen as a local retriever.

Fault tolerance: shard actors are created with ``max_restarts`` (Ray starts a dead actor again, which
reloads its shards) and ``max_task_retries`` (Ray resubmits calls that were in flight when it died). On
top of that the front resubmits a shard's call itself when Ray still reports the actor dead or
unavailable (its restart under way, or Ray's retries used up), a bounded number of times, and a call that
takes longer than ``call_timeout_s`` counts as a hung actor: it is killed (Ray starts it again) and the call
resubmitted. A shard actor killed or hung in the middle of a batch therefore costs time, never a query.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError
from torch import Tensor

from vrag_rl.retrieval.base import BaseRetriever, PageCatalog, as_embedder
from vrag_rl.retrieval.bm25 import BM25Index
from vrag_rl.retrieval.dense import DenseConfig
from vrag_rl.retrieval.embed import EmbedderConfig, PageEmbedder
from vrag_rl.retrieval.index import MultiVectorIndex
from vrag_rl.retrieval.types import Hit, IndexMode, SearchMode, SearchSettings, rank

log = logging.getLogger(__name__)


@dataclass
class RetrieverConfig:
    """The retriever on Ray: how many shard actors, their resources, and how calls survive a dead actor."""

    shard_actors: int = 1  # capped at the index's shard count
    num_cpus: float = 0.25  # per actor (the front and each shard actor); fractional, to fit beside trainers
    embed_batch_size: int = 4  # query embedding batch of the front's model
    max_restarts: int = -1  # -1: Ray restarts a dead shard actor without limit
    max_task_retries: int = 3  # Ray's resubmissions of a call that was in flight when its actor died
    retries: int = 5  # the front's own resubmissions after Ray gave up on a call
    retry_wait_s: float = 1.0  # between the front's resubmissions (a restart takes seconds: imports, load)
    call_timeout_s: float = 120.0  # a shard call still running after this is taken for a hung actor
    # on top of it for a call to an actor that is starting (imports, shard load: slow on a busy machine)
    start_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.shard_actors < 1 or self.num_cpus <= 0 or self.embed_batch_size < 1 or self.retries < 0:
            raise ValueError("retriever: shard_actors >= 1, num_cpus > 0, embed_batch_size >= 1, retries >= 0")
        if self.call_timeout_s <= 0 or self.start_timeout_s < 0:
            raise ValueError("retriever: call_timeout_s > 0 and start_timeout_s >= 0")


class ShardActor:
    """Holds some of the index's shards and answers top-k over them. Threaded (see ``options``) so that
    ``stats`` answers while a search runs; searches only read the index."""

    def __init__(self, index_dir: str, shards: list[int], fingerprint: str | None):
        self.shards = list(shards)
        self.index = MultiVectorIndex.load(index_dir, shards=self.shards, expected_fingerprint=fingerprint)
        self._lock = threading.Lock()
        self._started = 0
        self._finished = 0

    def search(self, embeddings: list[Tensor], top_k: int, mode: IndexMode) -> list[list[tuple[str, float]]]:
        with self._lock:
            self._started += 1
        out = self.index.search(embeddings, top_k, mode)
        with self._lock:
            self._finished += 1
        return out

    def stats(self) -> dict:
        with self._lock:
            return {
                "pid": os.getpid(),
                "shards": self.shards,
                "num_pages": len(self.index.page_ids),
                "started": self._started,
                "finished": self._finished,
            }


def shard_groups(num_shards: int, num_actors: int) -> list[list[int]]:
    """Contiguous, near-equal groups of shard numbers, one per actor (never an empty group)."""
    if num_shards < 1:
        raise ValueError("the index has no shards")
    return [g.tolist() for g in np.array_split(np.arange(num_shards), min(num_actors, num_shards))]


class DistributedRetriever(BaseRetriever):
    """The retriever with the visual index spread over Ray shard actors; the embedder runs in this process.

    Needs a running Ray (``ray.init``). Same constructor as ``LocalRetriever`` plus ``actors`` and the class
    the shard actors run (``ShardActor`` or a subclass of it).
    """

    def __init__(
        self,
        corpus_dir: str | Path,
        index_dir: str | Path,
        embedder: EmbedderConfig | PageEmbedder,
        text_index: BM25Index | str | Path | None = None,
        dense: DenseConfig | None = None,
        settings: SearchSettings = SearchSettings(),
        actors: RetrieverConfig = RetrieverConfig(),
        shard_actor: type[ShardActor] = ShardActor,
    ):
        super().__init__(corpus_dir, as_embedder(embedder), text_index, dense, settings)
        self.cfg = actors
        index_dir = str(Path(index_dir).resolve())  # actors may run with another working directory
        remote = ray.remote(shard_actor).options(
            num_cpus=actors.num_cpus,
            max_restarts=actors.max_restarts,
            max_task_retries=actors.max_task_retries,
            max_concurrency=2,
        )
        fingerprint = self.embedder.fingerprint
        # The manifest alone (no shards): fails here, before any actor starts, on a stale index or another
        # model's, and gives the index order that breaks score ties exactly as the single-process index does.
        manifest = MultiVectorIndex.load(
            index_dir, shards=[], expected_fingerprint=fingerprint, corpus_dir=self.catalog.root
        )
        self._tie_order = {pid: i for i, pid in enumerate(manifest.all_page_ids)}
        groups = shard_groups(manifest.num_shards, actors.shard_actors)
        self.shard_actors = [remote.remote(index_dir, g, fingerprint) for g in groups]
        # wait until every actor has loaded its shards (their load errors surface here)
        self._call_all(lambda a: a.stats.remote(), starting=True)

    def _call_all(self, submit, starting: bool = False) -> list:
        """``submit(actor)`` on every shard actor in parallel; a call whose actor died or hung is resubmitted.
        A call to an actor that is starting (``starting``, or restarted by an earlier attempt) may take
        ``start_timeout_s`` longer before it counts as hung."""
        refs = [submit(a) for a in self.shard_actors]
        out = []
        for actor, ref in zip(self.shard_actors, refs):
            for attempt in range(self.cfg.retries + 1):
                timeout = self.cfg.call_timeout_s + (self.cfg.start_timeout_s if starting or attempt else 0.0)
                try:
                    out.append(ray.get(ref, timeout=timeout))
                    break
                except (RayActorError, GetTimeoutError) as err:  # died (or restarting), or hung
                    if attempt == self.cfg.retries:
                        raise
                    if isinstance(err, GetTimeoutError):
                        log.warning("shard actor call hung for %.0fs; restarting the actor", timeout)
                        ray.kill(actor, no_restart=False)
                    log.warning(
                        "shard actor call failed (%s); resubmitting (%d/%d)",
                        type(err).__name__,
                        attempt + 1,
                        self.cfg.retries,
                    )
                    time.sleep(self.cfg.retry_wait_s)
                    ref = submit(actor)
        return out

    def _visual_topk(self, embeddings: list[Tensor], top_k: int) -> list[list[tuple[str, float]]]:
        emb_ref = ray.put(embeddings)  # one copy in the object store, read by every shard actor
        per_actor = self._call_all(lambda a: a.search.remote(emb_ref, top_k, self.settings.index_mode))
        # per_actor[a][q]: actor a's top-k for query q; a page lives in one shard, so no page comes twice.
        merged = [[h for hits in per_query for h in hits] for per_query in zip(*per_actor)]
        return [rank(hits, self._tie_order, top_k) for hits in merged]

    def shard_stats(self) -> list[dict]:
        """Per shard actor: pid, shards, page count, searches started and finished (since its last start)."""
        return self._call_all(lambda a: a.stats.remote())


def start_retriever_actor(
    corpus_dir: str | Path, index_dir: str | Path, embedder: EmbedderConfig, cfg: RetrieverConfig, **kwargs
):
    """A ``DistributedRetriever`` running as a Ray actor (further arguments as for ``DistributedRetriever``).

    Call ``ray.get(handle.search.remote(queries, top_k, mode))``, or wrap the handle in ``RemoteRetriever``.
    Pass the ``EmbedderConfig``, not a loaded embedder: the actor loads the model itself. If the front actor
    dies, Ray restarts it (it starts fresh shard actors; the old ones die with their owner) and resubmits the
    calls that were in flight.
    """
    remote = ray.remote(DistributedRetriever).options(num_cpus=cfg.num_cpus, max_restarts=-1, max_task_retries=3)
    return remote.remote(corpus_dir, index_dir, embedder, actors=cfg, **kwargs)


class RemoteRetriever:
    """The retriever actor (``start_retriever_actor``) seen as a local retriever; page files are read from the
    corpus directory, which every node of the cluster sees."""

    def __init__(self, handle, corpus_dir: str | Path):
        self.handle = handle
        self.catalog = PageCatalog(corpus_dir)

    def search(self, queries: list[str], top_k: int = 5, mode: str = SearchMode.VISUAL) -> list[list[Hit]]:
        return ray.get(self.handle.search.remote(queries, top_k, mode))

    def page_path(self, page_id: str) -> Path:
        return self.catalog.page_path(page_id)
