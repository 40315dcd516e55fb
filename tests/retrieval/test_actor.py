"""The retriever on Ray: shard actors give the single-process answers and survive a kill in the middle of a batch."""

import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray
from PIL import Image
from ray.exceptions import ActorDiedError

from vrag_rl.data.records import load_pages
from vrag_rl.retrieval.actor import (
    DistributedRetriever,
    RetrieverConfig,
    ShardActor,
    shard_groups,
    start_retriever_actor,
)
from vrag_rl.retrieval.local import LocalRetriever
from vrag_rl.retrieval.types import SearchSettings

QUERIES = ["annual revenue table", "Lagas Dynamics research centre", "bar chart", "who founded it", "net profit", "map"]
DELAY = 0.5  # each shard search sleeps this long: time to kill an actor while a batch is in flight


class SlowShardActor(ShardActor):
    """A shard actor whose searches take ``DELAY`` longer: a test can kill it while a batch is in flight."""

    def search(self, embeddings, top_k, mode):
        with self._lock:
            self._started += 1  # stats() sees the search under way while it sleeps
        time.sleep(DELAY)
        out = self.index.search(embeddings, top_k, mode)
        with self._lock:
            self._finished += 1
        return out


HANG_MARKER = Path(tempfile.gettempdir()) / f"vrag-rl-hang-{uuid.uuid4().hex}"


class HangingShardActor(ShardActor):
    """A shard actor whose first search, in the first process to run one, never returns."""

    def search(self, embeddings, top_k, mode):
        if not HANG_MARKER.exists():
            HANG_MARKER.touch()
            time.sleep(600)
        return super().search(embeddings, top_k, mode)


# Ray's workers cannot import this test module: the classes travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_shard_groups():
    assert shard_groups(3, 2) == [[0, 1], [2]]
    assert shard_groups(1, 2) == [[0]]
    assert shard_groups(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError):
        shard_groups(0, 2)


class _FlakyActor:
    """Stands in for a shard actor handle: its first ``failures`` calls die the way Ray reports a dead actor."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0
        self.search = self

    def remote(self, *args):
        self.calls += 1
        return ActorDiedError() if self.calls <= self.failures else ("answer", args)


def test_front_resubmits_after_ray_gave_up_and_bounds_it(monkeypatch):
    """The front's own retry loop (Ray's max_task_retries exhausted): resubmit, then give up after ``retries``."""
    import vrag_rl.retrieval.actor as actor_mod

    timeouts = []

    def fake_get(ref, timeout=None):
        timeouts.append(timeout)
        if isinstance(ref, Exception):
            raise ref
        return ref

    monkeypatch.setattr(actor_mod.ray, "get", fake_get)
    front = DistributedRetriever.__new__(DistributedRetriever)
    front.cfg = RetrieverConfig(retries=2, retry_wait_s=0.0, call_timeout_s=3.0, start_timeout_s=60.0)
    front.shard_actors = [_FlakyActor(0), _FlakyActor(2)]
    assert front._call_all(lambda a: a.search.remote(7)) == [("answer", (7,)), ("answer", (7,))]
    assert [a.calls for a in front.shard_actors] == [1, 3]
    assert timeouts == [3.0, 3.0, 63.0, 63.0]  # a resubmission waits for the restarting actor's start-up too
    timeouts.clear()
    front._call_all(lambda a: a.search.remote(7), starting=True)
    assert timeouts == [63.0, 63.0]
    front.shard_actors = [_FlakyActor(3)]
    with pytest.raises(ActorDiedError):
        front._call_all(lambda a: a.search.remote(7))
    assert front.shard_actors[0].calls == 3


@pytest.fixture(scope="module")
def oracle(bundled_corpus, visual_index, embedder) -> LocalRetriever:
    return LocalRetriever(bundled_corpus, visual_index, embedder)


@pytest.fixture(scope="module")
def distributed(ray_session, bundled_corpus, visual_index, embedder) -> DistributedRetriever:
    """Embeds in this process with the oracle's own model; the index's 3 shards live in 2 shard actors."""
    cfg = RetrieverConfig(shard_actors=2, num_cpus=0.25, retry_wait_s=0.5)
    return DistributedRetriever(bundled_corpus, visual_index, embedder, actors=cfg, shard_actor=SlowShardActor)


def test_shards_are_spread_over_actors(distributed, oracle):
    stats = distributed.shard_stats()
    assert len(stats) == 2 and len({s["pid"] for s in stats}) == 2
    assert [sh for s in stats for sh in s["shards"]] == list(range(oracle.index.num_shards))
    assert [s["num_pages"] for s in stats] == [16, 8]


def test_results_equal_single_process(distributed, oracle, bundled_corpus, monkeypatch):
    assert distributed.search(QUERIES, top_k=7) == oracle.search(QUERIES, top_k=7)
    assert distributed.search(QUERIES[:2], top_k=24) == oracle.search(QUERIES[:2], top_k=24)
    images = [Image.open(p.file).convert("RGB") for p in load_pages(bundled_corpus)[5:7]]
    assert distributed.search_by_image(images, 3) == oracle.search_by_image(images, 3)
    # Approximate mode: every shard has its own FAISS index, so the split over actors changes nothing either.
    monkeypatch.setattr(distributed, "settings", SearchSettings(index_mode="approx"))
    monkeypatch.setattr(oracle, "settings", SearchSettings(index_mode="approx"))
    assert distributed.search(QUERIES, top_k=5) == oracle.search(QUERIES, top_k=5)


def test_actor_killed_mid_batch_is_restarted_and_no_query_lost(distributed, oracle):
    want = oracle.search(QUERIES, top_k=5)
    victim = distributed.shard_actors[0]
    before = ray.get(victim.stats.remote())
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(hits=distributed.search(QUERIES, top_k=5)))
    t.start()
    # Wait until the victim is inside the batch's search, then kill it (Ray may restart it).
    deadline = time.monotonic() + 60
    while True:
        s = ray.get(victim.stats.remote())
        if s["started"] > s["finished"]:
            break
        assert time.monotonic() < deadline and t.is_alive(), "the batch never reached the shard actor"
        time.sleep(0.05)
    ray.kill(victim, no_restart=False)
    t.join(120)
    assert not t.is_alive(), "the batch never finished after the kill"
    assert result["hits"] == want  # every query answered, and answered right
    after = ray.get(victim.stats.remote())
    assert after["pid"] != before["pid"]  # the same actor handle, a new process: Ray restarted it
    assert after["shards"] == before["shards"]
    assert distributed.search(QUERIES[:2], top_k=5) == want[:2]


def test_front_actor(ray_session, oracle, bundled_corpus, visual_index, embedder_cfg):
    """The front itself as an actor (what rollout workers share): same answers."""
    handle = start_retriever_actor(bundled_corpus, visual_index, embedder_cfg, RetrieverConfig(num_cpus=0.25))
    try:
        got = ray.get(handle.search.remote(QUERIES[:3], 5, "visual"))
        assert got == oracle.search(QUERIES[:3], top_k=5)
    finally:
        ray.kill(handle)


def test_a_hung_shard_actor_is_restarted_and_the_search_answered(
    ray_session, oracle, bundled_corpus, visual_index, embedder
):
    cfg = RetrieverConfig(shard_actors=1, num_cpus=0.25, call_timeout_s=3.0, retry_wait_s=0.5)
    hung = DistributedRetriever(bundled_corpus, visual_index, embedder, actors=cfg, shard_actor=HangingShardActor)
    try:
        before = hung.shard_stats()[0]["pid"]
        t0 = time.monotonic()
        assert hung.search(QUERIES, top_k=5) == oracle.search(QUERIES, top_k=5)
        assert HANG_MARKER.exists() and time.monotonic() - t0 >= 3.0  # it hung, timed out, and was retried
        assert hung.shard_stats()[0]["pid"] != before  # in a new process
    finally:
        for actor in hung.shard_actors:
            ray.kill(actor)
        HANG_MARKER.unlink(missing_ok=True)
