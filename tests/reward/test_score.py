import math
import uuid

import pytest

from vrag_rl.reward.judge import JudgeClient
from vrag_rl.reward.score import RewardConfig, RewardInput, format_score, score


def _input(**overrides) -> RewardInput:
    fields = dict(
        question="What colour is the logo?",
        reference="dark blue",
        prediction="dark blue",
        retrieved_pages=["doc_3", "doc_1"],
        gold_pages=["doc_1"],
        num_searches=2,
        num_actions=3,
        num_invalid=0,
    )
    fields.update(overrides)
    return RewardInput(**fields)


def test_weighted_total_hand_computed():
    item = _input(prediction="The logo is dark blue", num_actions=4, num_invalid=1)
    (result,) = score([item], RewardConfig())
    ndcg = 1 / math.log2(3)  # the one gold page at rank 2
    f1 = 2 * (2 / 4) * 1 / (2 / 4 + 1)  # pred tokens [logo is dark blue], ref [dark blue]
    assert result.ndcg == pytest.approx(ndcg)
    assert result.answer == pytest.approx(f1)
    assert result.format == pytest.approx(3 / 4)
    assert result.total == pytest.approx(0.2 * ndcg + 0.7 * f1 + 0.1 * 3 / 4)
    assert (result.gated, result.answer_status) == (False, "ok")

    weights = RewardConfig(ndcg_weight=1.0, answer_weight=0.0, format_weight=2.0)
    (reweighted,) = score([item], weights)
    assert reweighted.total == pytest.approx(ndcg + 2 * 3 / 4)


@pytest.mark.parametrize(
    ("metric", "prediction", "expected"),
    [
        ("exact_match", "Dark blue.", 1.0),
        ("exact_match", "blue", 0.0),
        ("f1", "blue", 2 * 1 * 0.5 / 1.5),
        ("anls", "dark blu", 1 - 1 / 9),
        ("anls", "red", 0.0),
    ],
)
def test_rule_metrics(metric, prediction, expected):
    (result,) = score([_input(prediction=prediction)], RewardConfig(answer_metric=metric))
    assert result.answer == pytest.approx(expected)


def test_reference_list_takes_best_match():
    item = _input(reference=["navy", "dark blue"], prediction="navy")
    (result,) = score([item], RewardConfig(answer_metric="exact_match"))
    assert result.answer == 1.0


def test_gate_without_search_reports_parts():
    (result,) = score([_input(num_searches=0)], RewardConfig())
    assert result.gated and result.total == 0.0
    assert result.answer == 1.0 and result.ndcg == pytest.approx(1 / math.log2(3)) and result.format == 1.0
    (ungated,) = score([_input(num_searches=0)], RewardConfig(require_search=False))
    assert not ungated.gated and ungated.total > 0.0


def test_gate_without_answer():
    (result,) = score([_input(prediction=None)], RewardConfig())
    assert (result.gated, result.total, result.answer, result.answer_status) == (True, 0.0, 0.0, "no_answer")
    assert result.ndcg > 0.0
    (ungated,) = score([_input(prediction=None)], RewardConfig(require_answer=False))
    assert not ungated.gated
    assert ungated.total == pytest.approx(0.2 * ungated.ndcg + 0.1 * 1.0)


def test_empty_prediction_counts_as_answered():
    (result,) = score([_input(prediction="")], RewardConfig())
    assert not result.gated and result.answer == 0.0 and result.answer_status == "ok"


def test_format_score():
    assert format_score(4, 0) == 1.0
    assert format_score(4, 3) == 0.25
    assert format_score(0, 0) == 0.0


@pytest.mark.parametrize(
    "overrides",
    [
        {"answer_metric": "bleu"},
        {"ndcg_weight": -0.1},
        {"answer_weight": float("nan")},
        {"format_weight": float("inf")},
    ],
)
def test_config_validation(overrides):
    with pytest.raises(ValueError):
        RewardConfig(**overrides)


@pytest.mark.parametrize("counts", [{"num_invalid": 4, "num_actions": 3}, {"num_searches": -1}, {"num_actions": -1}])
def test_input_validation(counts):
    with pytest.raises(ValueError):
        _input(**counts)


def test_judge_metric_needs_a_client():
    with pytest.raises(ValueError):
        score([_input()], RewardConfig(answer_metric="judge"))


def test_judge_path_batches_and_scores(judge_server, fast_config):
    key = uuid.uuid4().hex
    inputs = [
        _input(question=f"q{i}", reference=f"answer{i}", prediction=f"I found answer{i}" if i % 2 == 0 else "unsure")
        for i in range(8)
    ]
    inputs.append(_input(prediction=None))  # never answered: gated and never sent to the judge
    with JudgeClient(fast_config(f"{judge_server.url}/slowgrade/{key}", max_in_flight=4)) as client:
        results = score(inputs, RewardConfig(answer_metric="judge"), client)
    assert [r.answer for r in results] == [1.0, 0.0] * 4 + [0.0]
    assert [r.answer_status for r in results] == ["ok"] * 8 + ["no_answer"]
    assert results[0].total == pytest.approx(0.2 * results[0].ndcg + 0.7 + 0.1)
    assert results[1].total == pytest.approx(0.2 * results[1].ndcg + 0.1)
    assert results[-1].gated and results[-1].total == 0.0
    assert judge_server.hits[f"slowgrade/{key}"] == 8
    assert 2 <= judge_server.peak_concurrency[key] <= 4  # sent concurrently, within the bound


@pytest.mark.parametrize(("scenario", "status"), [("status/503", "http_error"), ("body/%7B%7D", "bad_response")])
def test_judge_failures_score_zero_and_report_status(judge_server, fast_config, scenario, status):
    with JudgeClient(fast_config(f"{judge_server.url}/{scenario}", max_retries=1)) as client:
        (result,) = score([_input()], RewardConfig(answer_metric="judge"), client)
    assert (result.answer, result.answer_status, result.gated) == (0.0, status, False)
    assert result.total == pytest.approx(0.2 * result.ndcg + 0.1)
