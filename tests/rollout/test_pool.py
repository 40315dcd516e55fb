"""Rollout workers on Ray with the real vLLM CPU engine, against the real retriever actor, end to end.

The warm-started tiny policy searches, crops and answers, so these trajectories are multi-turn with page
images and crops. Checked: tasks come back in order with their groups; the log-probs vLLM sampled with match
the training forward over the whole recorded trajectory; the same seeds give the same trajectories; and
after a weight update streamed in buckets to both workers, greedy rollouts equal the transformers engine's
with the same weights, turn for turn.
"""

from __future__ import annotations

import pytest
import torch

from tests.rollout.conftest import TINY_BUDGET, recompute_logprobs
from vrag_rl.data.records import load_qa
from vrag_rl.learner.payloads import iter_buckets
from vrag_rl.rollout.agent_loop import AgentConfig
from vrag_rl.rollout.engine import SamplingConfig
from vrag_rl.rollout.records import make_groups
from vrag_rl.rollout.vllm_engine import VLLMConfig
from vrag_rl.rollout.worker import RolloutConfig, RolloutPool, RolloutWorker

LOGPROB_TOL = 1e-4
AGENT = AgentConfig(max_turns=3, max_length=4096, budget=TINY_BUDGET)
SAMPLING = SamplingConfig(temperature=0.7, max_tokens=96)


@pytest.fixture(scope="module")
def retriever_actor(ray_session, bundled_corpus, bundled_index, embedder_cfg):
    import ray

    from vrag_rl.retrieval.actor import RetrieverConfig, start_retriever_actor

    handle = start_retriever_actor(
        bundled_corpus, bundled_index, embedder_cfg, RetrieverConfig(shard_actors=2, num_cpus=0.1)
    )
    yield handle
    ray.kill(handle)


@pytest.fixture(scope="module")
def pool(retriever_actor, warm_policy, bundled_corpus):
    vllm = VLLMConfig(
        dtype="float32", max_model_len=4096, max_images=3, kv_cache_memory_bytes=64 << 20, enforce_eager=True
    )
    cfg = RolloutConfig(
        engine="vllm",
        model_dir=str(warm_policy),
        vllm=vllm,
        agent=AGENT,
        num_workers=2,
        num_cpus=0.5,
        bucket_bytes=256 << 10,
    )
    p = RolloutPool(cfg, retriever_actor, str(bundled_corpus)).ready()
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def tasks(bundled_corpus):
    qa = load_qa(bundled_corpus)[::7][:6]
    return make_groups([(r.qid, r.question) for r in qa], n=2, seed=0)


@pytest.fixture(scope="module")
def sampled(pool, tasks):
    return pool.rollout(tasks, SAMPLING)


def test_multi_turn_rollouts_with_images_and_crops(sampled, tasks, retriever):
    assert [r.task for r in sampled] == tasks
    kinds = [a.kind for r in sampled for a in r.actions]
    assert kinds.count("search") >= 4 and kinds.count("bbox") >= 2 and kinds.count("answer") >= 2, kinds
    for r in sampled:
        t = r.trajectory
        assert all(p in retriever.catalog for p in r.retrieved_pages)
        assert len(t.images) == len(r.retrieved_pages) + len(r.crops)
        assert r.stop_reason in ("answer", "turn_limit", "length")
        assert all(lp is not None for lp, m in zip(t.sampled_logprobs, t.response_mask) if m)
    assert any(r.crops and r.finished for r in sampled)


def test_sampled_logprobs_match_the_training_forward(sampled, warm_policy, encoder):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(warm_policy, dtype=torch.float32).eval()
    worst = 0.0
    for r in sampled:
        t = r.trajectory
        mask = torch.tensor(t.response_mask, dtype=torch.bool)
        want = recompute_logprobs(model, t, encoder, SAMPLING.temperature)[mask]
        got = torch.tensor([lp for lp, m in zip(t.sampled_logprobs, t.response_mask) if m])
        worst = max(worst, (got - want).abs().max().item())
    assert worst < LOGPROB_TOL


def test_same_seeds_same_trajectories(pool, tasks, sampled):
    again = pool.rollout(tasks, SAMPLING)
    assert [r.trajectory.input_ids for r in again] == [r.trajectory.input_ids for r in sampled]


def test_streamed_update_then_greedy_equals_hf(pool, tasks, warm_policy, retriever):
    """Runs last in this module: it changes the workers' weights. A batch submitted before the update samples
    with the old weights (what sampling ahead relies on, job/lookahead.py); every turn carries its version."""
    cfg = RolloutConfig(engine="hf", model_dir=str(warm_policy), dtype="float32", agent=AGENT)
    hf = RolloutWorker(cfg, retriever=retriever)
    g = torch.Generator().manual_seed(0)
    new = {k: v.detach() + 0.003 * torch.randn(v.shape, generator=g) for k, v in hf.engine.model.named_parameters()}
    greedy = SamplingConfig(temperature=0.0, max_tokens=96)
    old = hf.rollout(tasks, greedy)
    before = pool.submit(tasks, greedy)
    hf.update_weights([new], version=1)  # one bucket in process; several through the object store
    sync = pool.update_weights(iter_buckets(new.items(), 64 << 10), version=1)
    assert sync.bytes == sum(v.numel() * 4 for v in new.values()) and sync.seconds > 0
    got, want = pool.rollout(tasks, greedy), hf.rollout(tasks, greedy)
    assert [r.trajectory.input_ids for r in got] == [r.trajectory.input_ids for r in want]
    assert [r.texts for r in got] == [r.texts for r in want]
    ahead = before.result()
    assert [r.trajectory.input_ids for r in ahead] == [r.trajectory.input_ids for r in old]
    assert {v for r in ahead for v in r.versions} == {0} and {v for r in got for v in r.versions} == {1}


def test_a_partial_update_goes_into_the_running_batch_at_a_turn_boundary(pool, bundled_corpus, warm_policy, retriever):
    """``rollout.partial``: the update runs beside the batch and returns before it ends; the batch's later turns
    carry the new version, no trajectory goes back to an older one. Runs after the update test above."""
    import time

    import ray

    cfg = RolloutConfig(engine="hf", model_dir=str(warm_policy), dtype="float32", agent=AGENT)
    weights = {k: v.detach() for k, v in RolloutWorker(cfg, retriever=retriever).engine.model.named_parameters()}
    qa = load_qa(bundled_corpus)[:16]
    batch = pool.submit(make_groups([(r.qid, r.question) for r in qa], n=2, seed=1), SAMPLING)
    time.sleep(0.5)  # the workers have started the batch
    pool.partial = True
    try:
        sync = pool.update_weights(iter_buckets(weights.items(), 64 << 10), version=2)
    finally:
        pool.partial = False
    assert ray.wait(batch.refs, num_returns=len(batch.refs), timeout=0)[1], "the batch ended before the update"
    rollouts = batch.result()
    versions = [r.versions for r in rollouts]
    assert all(v == sorted(v) for v in versions) and {1, 2} <= {x for v in versions for x in v}, versions
    assert sync.seconds > 0
