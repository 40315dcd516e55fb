"""The judge against a real vLLM OpenAI-compatible server (``vllm.entrypoints.openai.api_server``, the session's
``vllm_server``) running the warm tiny policy on 127.0.0.1: unconstrained, its replies are no verdict (it writes
thoughts and actions); with ``constrain_verdict`` every reply is True or False."""

from __future__ import annotations

from vrag_rl.reward.judge import JudgeClient, JudgeConfig

ITEMS = [(f"What is item {i}?", f"answer {i}", f"it is answer {i}") for i in range(6)]


def judge(base_url: str, constrain: bool) -> list:
    cfg = JudgeConfig(base_url=base_url, model="tiny", timeout_s=120, max_retries=0, constrain_verdict=constrain)
    with JudgeClient(cfg) as client:
        return client.judge_batch(ITEMS)


def test_a_constrained_verdict_is_always_true_or_false(vllm_server):
    free = judge(vllm_server, constrain=False)
    assert not all(r.status == "ok" for r in free), [r.detail for r in free]  # a random model writes no verdict
    constrained = judge(vllm_server, constrain=True)
    assert all(r.status == "ok" and r.correct in (True, False) for r in constrained), [r.detail for r in constrained]
