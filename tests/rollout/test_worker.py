"""Rollout workers: task spreading, bucketed weight streams, and the HF-engine worker end to end in-process."""

from __future__ import annotations

import pytest
import torch

from tests.rollout.conftest import TINY_BUDGET
from vrag_rl.data.records import load_qa
from vrag_rl.learner.payloads import iter_buckets
from vrag_rl.rollout.agent_loop import AgentConfig
from vrag_rl.rollout.engine import SamplingConfig
from vrag_rl.rollout.records import make_groups
from vrag_rl.rollout.vllm_engine import VLLMConfig, collapse_runs
from vrag_rl.rollout.worker import RolloutConfig, RolloutWorker, WeightStream, split_by_group


def test_split_by_group_keeps_groups_whole():
    tasks = make_groups([(str(i), f"q{i}") for i in range(5)], n=3, seed=0)
    chunks = split_by_group(tasks, 2)
    assert sorted(i for c in chunks for i in c) == list(range(15))
    for chunk in chunks:
        groups = {tasks[i].group for i in chunk}
        assert all(sum(tasks[i].group == g for i in chunk) == 3 for g in groups)
    assert [len(c) for c in chunks] == [9, 6]
    assert split_by_group(tasks[:3], 4) == [[0, 1, 2]]  # fewer groups than workers: no empty chunk


def test_iter_buckets_and_collapse():
    named = [(f"w{i}", torch.zeros(i + 1, dtype=torch.float32)) for i in range(6)]  # 4..24 bytes
    buckets = list(iter_buckets(named, 24))
    assert [list(b) for b in buckets] == [["w0", "w1", "w2"], ["w3"], ["w4"], ["w5"]]
    assert [n for b in buckets for n in b] == [n for n, _ in named]
    with pytest.raises(ValueError):
        list(iter_buckets(named, 0))
    assert collapse_runs([1, 7, 7, 7, 2, 7, 3, 7, 7], 7) == [1, 7, 2, 7, 3, 7]


def test_config_checks():
    with pytest.raises(ValueError, match="engine"):
        RolloutConfig(engine="sglang")
    with pytest.raises(ValueError, match="max_images"):
        RolloutConfig(vllm=VLLMConfig(max_images=2), agent=AgentConfig(max_turns=4))
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        VLLMConfig(tensor_parallel_size=2)
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)


@pytest.fixture(scope="module")
def hf_worker(tiny_dirs, retriever):
    cfg = RolloutConfig(
        engine="hf",
        model_dir=str(tiny_dirs["policy"]),
        dtype="float32",
        agent=AgentConfig(max_turns=2, max_length=2048, budget=TINY_BUDGET),
    )
    return RolloutWorker(cfg, retriever=retriever)


@pytest.mark.slow  # three sampled rollouts on the transformers engine: about a minute on 2 cores
def test_hf_worker_is_reproducible_under_a_seed(hf_worker, bundled_corpus):
    qa = load_qa(bundled_corpus)[:2]
    sampling = SamplingConfig(temperature=1.0, max_tokens=24)
    tasks = make_groups([(r.qid, r.question) for r in qa], n=2, seed=5)
    first = hf_worker.rollout(tasks, sampling)
    again = hf_worker.rollout(tasks, sampling)
    assert [r.trajectory.input_ids for r in first] == [r.trajectory.input_ids for r in again]
    assert first[0].trajectory.input_ids != first[1].trajectory.input_ids  # two samples of one group differ
    other = hf_worker.rollout(make_groups([(r.qid, r.question) for r in qa], n=2, seed=6), sampling)
    assert [r.trajectory.input_ids for r in other] != [r.trajectory.input_ids for r in first]
    timings = hf_worker.timings()
    assert timings["total_s"] >= timings["generate_s"] > 0


def test_weight_stream_feeds_one_update(hf_worker):
    model = hf_worker.engine.model
    new = {k: v.detach() + 1.0 for k, v in model.named_parameters()}
    hf_worker.begin_weight_update()
    with pytest.raises(RuntimeError, match="already"):
        hf_worker.begin_weight_update()
    for bucket in iter_buckets(new.items(), 64 << 10):
        hf_worker.push_weights(bucket)
    assert hf_worker.finish_weight_update(version=1) == sum(t.numel() * 4 for t in new.values())
    assert hf_worker.loop.version == 1
    assert all(torch.equal(p, new[k]) for k, p in model.named_parameters())


def test_weight_stream_surfaces_engine_errors(hf_worker):
    stream = WeightStream(hf_worker.engine, timeout_s=5)
    stream.push({"not.a.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="weight update failed"):
        stream.finish()
