"""The DeepSpeed ZeRO backend against FSDP2: two Ray ranks each (gloo, ``DS_ACCELERATOR=cpu``), the same updates.

The sequence: an SFT step, the schedule advanced, two GRPO steps with a KL term to the reference and an entropy
bonus (the second on a batch where one rank gets only image-less micro-batches). Under ZeRO-3 and ZeRO-2, every
log-prob, metric and weight equals FSDP2's within float32 reduction-order noise; a run saved after the first
GRPO step and resumed in fresh ranks continues bit for bit; a NaN on one rank skips the update on both. In bf16
compute ZeRO-3 and FSDP2 agree to bf16 precision.
"""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch

from tests.learner.test_policy import ADVANTAGES, CFG, OBJECTIVE, RunsCode
from vrag_rl.learner.payloads import Batch

# fp32 on both; the backends sum gradients over ranks in other orders, so results agree to rounding only.
LOGP_ATOL = 1e-5
METRIC_REL = 1e-4
# Adam divides by the root of the squared-gradient average, which turns rounding in a near-zero gradient into a
# visible share of a step: seen up to 3.1e-6 on a few elements in 1e5, after three steps of at most 1e-3 each.
WEIGHT_ATOL = 1e-5  # 1% of one step
WEIGHT_CLOSE = 1e-6  # ... and all but 1 element in 1e4 within this


def group_of(tiny_dirs, **changes):
    from vrag_rl.learner.ranks import TrainerGroup

    return TrainerGroup(dataclasses.replace(CFG, **changes), str(tiny_dirs["policy"]), OBJECTIVE, 10)


def run_steps(group, trajectories, first: int = 0, save_to=None) -> list[dict]:
    """The steps from ``first`` on; each records the log-probs it starts from and the update's metrics.
    ``save_to``: a checkpoint after the first GRPO step."""
    mixed = [trajectories[0], trajectories[3], trajectories[7]]
    steps = [
        lambda: {"sft": group.sft_update(trajectories[::4]), "lr": group.end_step()},
        lambda: grpo(group, trajectories, ADVANTAGES),
        lambda: grpo(group, mixed, [1.0, -1.0, 0.5]),
    ]
    out = []
    for k in range(first, len(steps)):
        out.append(steps[k]())
        if save_to is not None and k == 1:
            group.save(save_to)
    return out


def grpo(group, trajectories, advantages) -> dict:
    old = group.logprobs(trajectories)
    ref = group.logprobs(trajectories, reference=True)
    return {"old": old, "ref": ref, "update": group.grpo_update(Batch(trajectories, advantages, old, ref))}


def exported(group, directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    group.export(directory, "float32")
    return load_file(directory / "model.safetensors")


@pytest.fixture(scope="module")
def fsdp_run(ray_session, tiny_dirs, trajectories, tmp_path_factory):
    group = group_of(tiny_dirs)
    try:
        steps = run_steps(group, trajectories)
        return steps, exported(group, tmp_path_factory.mktemp("fsdp") / "policy")
    finally:
        group.shutdown()


def assert_same_run(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        if "sft" in w:
            assert g["lr"] == w["lr"]
            for key, value in w["sft"].items():
                assert g["sft"][key] == pytest.approx(value, rel=METRIC_REL, abs=1e-6), key
            continue
        for part in ("old", "ref"):
            for a, b in zip(g[part], w[part], strict=True):
                torch.testing.assert_close(a, b, atol=LOGP_ATOL, rtol=0)
        for key, value in w["update"].items():
            assert g["update"][key] == pytest.approx(value, rel=METRIC_REL, abs=1e-6), key


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, atol=WEIGHT_ATOL, rtol=0, msg=name)
    far = sum(int(((got[n] - w).abs() > WEIGHT_CLOSE).sum()) for n, w in want.items())
    assert far <= sum(w.numel() for w in want.values()) * 1e-4, far


@pytest.fixture(scope="module")
def zero3_run(ray_session, tiny_dirs, trajectories, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    group = group_of(tiny_dirs, backend="deepspeed", zero_stage=3)
    try:
        steps = run_steps(group, trajectories, save_to=out / "ckpt")
        return steps, exported(group, out / "policy"), out / "ckpt"
    finally:
        group.shutdown()


def test_zero3_updates_equal_fsdp2(zero3_run, fsdp_run):
    assert_same_run(zero3_run[0], fsdp_run[0])
    assert_same_weights(zero3_run[1], fsdp_run[1])


def test_zero2_updates_equal_fsdp2(fsdp_run, tiny_dirs, trajectories, tmp_path):
    group = group_of(tiny_dirs, backend="deepspeed", zero_stage=2)
    try:
        assert_same_run(run_steps(group, trajectories), fsdp_run[0])
        assert_same_weights(exported(group, tmp_path / "policy"), fsdp_run[1])
    finally:
        group.shutdown()


def test_zero3_resume_continues_bit_for_bit_and_a_nan_skips_on_every_rank(
    zero3_run,
    tiny_dirs,
    trajectories,
    tmp_path,
):
    """Fresh ranks loaded from the checkpoint saved after the first GRPO step take the second one exactly as the
    straight run did: log-probs, metrics, weights. Then a NaN in one trajectory's old log-probs (it reaches one
    rank only) skips the update on both ranks and leaves the weights as they were."""
    want_steps, want_weights, checkpoint = zero3_run
    group = group_of(tiny_dirs, backend="deepspeed", zero_stage=3)
    try:
        group.load(checkpoint)
        (got,) = run_steps(group, trajectories, first=2)
        want = want_steps[2]
        assert got["update"] == want["update"]
        assert all(torch.equal(a, b) for a, b in zip(got["old"] + got["ref"], want["old"] + want["ref"]))
        weights = exported(group, tmp_path / "resumed")
        assert all(torch.equal(weights[k], w) for k, w in want_weights.items())

        old = group.logprobs(trajectories)
        poisoned = [v.clone() for v in old]
        poisoned[5][0] = float("nan")
        assert group.grpo_update(Batch(trajectories, ADVANTAGES, poisoned))["skipped_updates"] == 1.0
        assert group.weights_finite()
        after = exported(group, tmp_path / "after-nan")
        assert all(torch.equal(after[k], w) for k, w in weights.items())
        assert group.grpo_update(Batch(trajectories, ADVANTAGES, old))["skipped_updates"] == 0.0
    finally:
        group.shutdown()


def test_a_zero_checkpoint_runs_no_code_planted_in_it(zero3_run, tiny_dirs, tmp_path):
    """DeepSpeed's checkpoint files are ``torch.save`` pickles, which its own engine loads with
    ``weights_only=False``: a call planted in each rank's optimizer state is refused, not made."""
    planted = tmp_path / "ckpt"
    shutil.copytree(zero3_run[2], planted)
    files = sorted(planted.glob("zero/zero_pp_rank_*_optim_states.pt"))
    assert len(files) == 2
    for f in files:
        state = torch.load(f, weights_only=False)  # the test's own file: trusted
        torch.save(state | {"planted": RunsCode(tmp_path / "ran")}, f)
    group = group_of(tiny_dirs, backend="deepspeed", zero_stage=3)
    try:
        with pytest.raises(Exception, match="(?s)Weights only load failed.*GLOBAL posix.mkdir"):
            group.load(planted)
    finally:
        group.shutdown()
    assert not (tmp_path / "ran").exists()


def test_zero3_in_bf16_trains_like_fsdp2_in_bf16(fsdp_run, tiny_dirs, trajectories, tmp_path):
    """bf16 compute on both (DeepSpeed's bf16 mode, FSDP2's mixed precision; fp32 master weights on both): the
    same steps stay finite and agree to bf16's precision, and they are not the fp32 run's numbers."""
    runs = {}
    for backend in ("fsdp2", "deepspeed"):
        group = group_of(tiny_dirs, backend=backend, param_dtype="bfloat16")
        try:
            runs[backend] = run_steps(group, trajectories), exported(group, tmp_path / backend)
        finally:
            group.shutdown()
    (ds_steps, ds_weights), (fsdp_steps, fsdp_weights) = runs["deepspeed"], runs["fsdp2"]
    for got, want in zip(ds_steps[1:], fsdp_steps[1:]):
        assert all(math.isfinite(v) for v in got["update"].values()), got["update"]
        diffs = torch.cat([(a - b).abs() for a, b in zip(got["old"], want["old"])])
        assert diffs.mean() < 0.01 and diffs.max() < 0.05, (float(diffs.mean()), float(diffs.max()))
    fp32 = torch.cat([(a - b).abs() for a, b in zip(ds_steps[1]["old"], fsdp_run[0][1]["old"])])
    assert fp32.mean() > 1e-4  # rounded: this is bf16 compute
    for name, w in fsdp_weights.items():  # three steps of at most lr 1e-3 each, Adam's sign flips included
        torch.testing.assert_close(ds_weights[name], w, atol=6e-3, rtol=0, msg=name)
