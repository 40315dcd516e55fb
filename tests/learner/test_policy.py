"""The policy trainer alone (one process) and as two FSDP2 ranks on Ray (gloo), on scripted trajectories.

Checked: a GRPO step raises the log-likelihood of positively advantaged trajectories and lowers that of
negatively advantaged ones; SFT lowers the NLL; two sharded ranks compute what one process computes (log-probs,
metrics, updated weights), including micro-batches without images; a saved and reloaded trainer continues
exactly (RNG included); the exported checkpoint loads in transformers with the trained weights.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
from pathlib import Path

import pytest
import torch

from vrag_rl.algo.config import AlgoConfig
from vrag_rl.learner.config import OptimConfig, TrainerConfig
from vrag_rl.learner.payloads import Batch, Objective, RankShare
from vrag_rl.learner.policy import PolicyTrainer

ALGO = AlgoConfig(prompts_per_step=2, group_size=4, kl_coef=0.01, entropy_coef=0.001)
OBJECTIVE = Objective(ALGO, temperature=1.0)
PURE = AlgoConfig(prompts_per_step=2, group_size=4, kl_coef=0.0)  # the policy gradient alone
CFG = TrainerConfig(num_workers=2, num_cpus=0.5, micro_batch_tokens=2048, optim=OptimConfig(lr=1e-3, warmup_steps=0))
ADVANTAGES = [1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5]


def one_rank(model_dir, objective: Objective = OBJECTIVE, cfg: TrainerConfig = CFG) -> PolicyTrainer:
    return PolicyTrainer.for_model(str(model_dir), cfg, objective, total_steps=10)


def whole(trajectories, advantages=None, old=None, ref=None) -> RankShare:
    """The batch as one rank's share: one micro-batch of all of it."""
    batch = Batch(trajectories, advantages, old, ref)
    everything = list(range(len(trajectories)))
    return RankShare(batch, [(everything, 1.0)], everything, batch.response_tokens)


def test_grpo_step_follows_the_advantage_sign(tiny_dirs, encoder):
    """One small step of the pure policy gradient (no KL, no entropy bonus, plain gradient step: Adam's first
    step moves every weight by lr whatever its gradient): trajectories with a positive advantage become more
    likely, those with a negative one less likely. Responses use disjoint token ranges, so that each sample's
    own gradient, not what it shares with the others, decides its change."""
    from vrag_rl.agent.trajectory import Trajectory

    prompt = encoder.tokenizer("<|im_start|>user\nwhat is shown?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    samples = []
    for k in range(4):
        t = Trajectory()
        t.add_prompt(prompt)
        t.add_model_turn([500 + 40 * k + j for j in range(12)] + [encoder.eos_token_id])
        samples.append(t)
    advantages = [1.0, -1.0, 1.0, -1.0]
    # A reference held, but a KL weight of 0: the KL term is computed (and 0 at the first step), not trained on.
    pure = AlgoConfig(prompts_per_step=2, group_size=2, kl_coef=0.0, entropy_coef=0.0)
    trainer = one_rank(tiny_dirs["policy"])
    trainer.objective = Objective(pure, temperature=1.0)
    old = trainer.logprobs(whole(samples))
    ref = trainer.logprobs(whole(samples), reference=True)
    assert all(torch.equal(a, b) for a, b in zip(old, ref))
    tokens = sum(sum(t.response_mask) for t in samples)
    trainer.backend.optimizer = torch.optim.SGD(trainer.backend.params, lr=0.05)
    metrics = trainer.grpo_update(whole(samples, advantages, old, ref))
    assert metrics["tokens"] == tokens and metrics["grad_norm"] > 0 and metrics["kl"] == 0.0
    new = trainer.logprobs(whole(samples))
    deltas = [(n - o).sum().item() for n, o in zip(new, old)]
    assert all(d > 1e-3 for d, a in zip(deltas, advantages) if a > 0), deltas
    assert all(d < -1e-3 for d, a in zip(deltas, advantages) if a < 0), deltas


def test_sft_lowers_the_nll(tiny_dirs, trajectories):
    trainer = one_rank(tiny_dirs["policy"], Objective())
    experts = trajectories[::4]
    first = trainer.sft_update(whole(experts))["nll"]
    for _ in range(3):
        last = trainer.sft_update(whole(experts))["nll"]
    assert last < first * 0.9


@pytest.mark.slow  # two trainers, forward and update passes: about a minute on 2 cores
def test_local_trainer_is_one_process_trainer_behind_the_group_interface(tiny_dirs, trajectories):
    from vrag_rl.learner.trainer import LocalTrainer

    local, single = LocalTrainer(CFG, str(tiny_dirs["policy"]), OBJECTIVE, 10), one_rank(tiny_dirs["policy"])
    old = local.logprobs(trajectories)
    want_old = single.logprobs(whole(trajectories))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(old, want_old))
    ref = local.logprobs(trajectories, reference=True)
    got = local.grpo_update(Batch(trajectories, ADVANTAGES, old, ref))
    want = single.grpo_update(whole(trajectories, ADVANTAGES, old, ref))
    assert got["pg_loss"] == pytest.approx(want["pg_loss"], rel=1e-4) and got["tokens"] == want["tokens"]
    assert local.end_step() == single.end_step()


def test_an_on_policy_update_without_old_logprobs_equals_one_with_them(tiny_dirs, trajectories):
    """``algo.old_logprobs=update``: the update's own forward stands in for the old log-probs, which on an
    on-policy step are the same numbers: the same metrics and weights as after a separate old-log-prob pass."""
    recomputed, own = one_rank(tiny_dirs["policy"]), one_rank(tiny_dirs["policy"])
    old = recomputed.logprobs(whole(trajectories))
    want = recomputed.grpo_update(whole(trajectories, ADVANTAGES, old))
    got = own.grpo_update(whole(trajectories, ADVANTAGES, None))
    assert got == want
    for (name, a), (_, b) in zip(recomputed.model.named_parameters(), own.model.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="old_logprobs=update needs an on-policy step"):
        AlgoConfig(prompts_per_step=2, mini_batches=2, old_logprobs="update")


def test_importance_weights_reach_the_loss(tiny_dirs, trajectories):
    """``Batch.is_weights`` multiply each token's policy loss: weights of 1 change nothing (metrics and weights
    equal an unweighted update's), weights of 0 leave no policy gradient."""
    plain, ones, zeros = (one_rank(tiny_dirs["policy"], Objective(PURE)) for _ in range(3))
    old = plain.logprobs(whole(trajectories))
    want = plain.grpo_update(whole(trajectories, ADVANTAGES, old))
    for trainer, value in ((ones, 1.0), (zeros, 0.0)):
        share = whole(trajectories, ADVANTAGES, old)
        share.batch.is_weights = [torch.full_like(v, value) for v in old]
        got = trainer.grpo_update(share)
        if value:
            assert got == want
        else:
            assert got["pg_loss"] == 0.0 and got["grad_norm"] == 0.0 and want["grad_norm"] > 0
    for (name, a), (_, b) in zip(plain.model.named_parameters(), ones.model.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.slow  # bf16 autocast training on CPU: minutes on 2 cores
def test_a_plain_trainer_with_bf16_param_dtype_computes_in_bf16_and_keeps_fp32_weights(tiny_dirs, trajectories):
    """Without a process group ``param_dtype`` goes through autocast: log-probs near fp32's but really rounded,
    float32 weights and optimizer, and SFT still learns."""
    fp32 = one_rank(tiny_dirs["policy"]).logprobs(whole(trajectories))
    cfg = TrainerConfig(param_dtype="bfloat16", micro_batch_tokens=2048, optim=OptimConfig(lr=1e-3, warmup_steps=0))
    trainer = one_rank(tiny_dirs["policy"], Objective(), cfg)
    bf16 = trainer.logprobs(whole(trajectories))
    diffs = torch.cat([(a - b).abs() for a, b in zip(bf16, fp32)])
    assert all(t.dtype == torch.float32 for t in bf16)
    assert 1e-4 < diffs.mean() < 0.05 and diffs.max() < 0.5, (float(diffs.mean()), float(diffs.max()))
    experts = trajectories[::4]
    first = trainer.sft_update(whole(experts))["nll"]
    for _ in range(3):
        last = trainer.sft_update(whole(experts))["nll"]
    assert last < first * 0.9
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_reloaded_trainer_continues_exactly(tiny_dirs, trajectories, tmp_path):
    """Saved after one SFT step, a trainer's second step equals that of a fresh trainer loaded from the
    checkpoint: weights, optimizer and schedule, and with attention dropout on, the RNG state too."""
    experts = whole(trajectories[::4])

    def with_dropout() -> PolicyTrainer:
        trainer = one_rank(tiny_dirs["policy"])
        for layer in trainer.model.model.language_model.layers:
            layer.self_attn.attention_dropout = 0.3
        return trainer

    first = with_dropout()
    first.sft_update(experts)
    first.end_step()
    first.save(tmp_path)
    want = first.sft_update(experts)
    second = with_dropout()
    torch.rand(7)  # a fresh process's RNG is elsewhere; loading must put it back
    second.load(tmp_path)
    assert second.sft_update(experts) == want
    for (name, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), name
    assert first.end_step() == second.end_step()


class RunsCode:
    """Unpickled, it makes a directory: any call a checkpoint from elsewhere could plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_loading_a_checkpoint_runs_no_code_planted_in_it(tiny_dirs, tmp_path):
    """DCP's ``.metadata`` is a pickle and each non-tensor value (here the learning rate) a ``torch.save``d object:
    a call planted in either is refused, not made; the checkpoint as saved loads."""
    import pickle

    from torch.distributed.checkpoint.api import CheckpointException

    trainer = one_rank(tiny_dirs["policy"])
    good = tmp_path / "good"
    good.mkdir()
    trainer.save(good)
    planted_meta, planted_value = tmp_path / "meta", tmp_path / "value"
    shutil.copytree(good, planted_meta)
    (planted_meta / ".metadata").write_bytes(pickle.dumps(RunsCode(tmp_path / "ran-metadata")))
    with pytest.raises(CheckpointException, match="names posix.mkdir, which is not a record .*: refused"):
        trainer.load(planted_meta)
    shutil.copytree(good, planted_value)
    with open(good / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # the test's own file: trusted
    payload = io.BytesIO()
    torch.save(RunsCode(tmp_path / "ran-value"), payload)
    (planted_value / "planted.distcp").write_bytes(payload.getvalue())
    lr = next(i for i in metadata.storage_data if i.fqn == "optim.param_groups.0.lr")
    stored = dataclasses.replace(metadata.storage_data[lr], relative_path="planted.distcp", offset=0)
    metadata.storage_data[lr] = dataclasses.replace(stored, length=len(payload.getvalue()))
    (planted_value / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointException, match="(?s)Weights only load failed.*GLOBAL posix.mkdir"):
        trainer.load(planted_value)
    assert not (tmp_path / "ran-metadata").exists() and not (tmp_path / "ran-value").exists()
    trainer.load(good)


@pytest.fixture(scope="module")
def group(ray_session, tiny_dirs):
    from vrag_rl.learner.ranks import TrainerGroup

    g = TrainerGroup(CFG, str(tiny_dirs["policy"]), OBJECTIVE, total_steps=10)
    yield g
    g.shutdown()


def check_update(group, single, trajectories, advantages) -> None:
    """The group's log-probs and GRPO step on ``trajectories`` equal the single process's."""
    tokens = sum(sum(t.response_mask) for t in trajectories)
    old, old_single = group.logprobs(trajectories), single.logprobs(whole(trajectories))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(old, old_single))
    ref = group.logprobs(trajectories, reference=True)

    got = group.grpo_update(Batch(trajectories, advantages, old, ref))
    want = single.grpo_update(whole(trajectories, advantages, old_single, ref))
    for key in ("pg_loss", "grad_norm", "tokens"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    for key in ("pg_clipfrac", "ppo_kl", "entropy", "kl"):
        assert got[key] == pytest.approx(want[key] / tokens, rel=1e-4, abs=1e-6), key
    assert group.end_step() == single.end_step()


def test_two_sharded_ranks_equal_one_process(group, tiny_dirs, trajectories, tmp_path_factory):
    single = one_rank(tiny_dirs["policy"])
    check_update(group, single, trajectories, ADVANTAGES)
    # Ranks whose micro-batches differ in images: the long expert trajectory (with images) goes to one rank,
    # the two image-less ones to the other. Both must still run their modules in the same order.
    mixed = [trajectories[0], trajectories[3], trajectories[7]]
    assert mixed[0].images and not mixed[1].images and not mixed[2].images
    check_update(group, single, mixed, [1.0, -1.0, 0.5])

    # The gathered weights, exported, equal the single process's.
    out = tmp_path_factory.mktemp("export") / "policy"
    group.export(out, "float32")
    from transformers import AutoModelForImageTextToText

    exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    for name, p in single.model.named_parameters():
        assert torch.allclose(dict(exported.named_parameters())[name], p, atol=1e-5), name


def test_a_nan_on_one_rank_skips_the_update_on_every_rank(group, trajectories, tmp_path_factory):
    """Runs after the parity test (it shares the group). A NaN in one trajectory's old log-probs reaches one
    rank only; both ranks skip the optimizer step, the weights stay finite and as they were, and a clean update
    after it is applied again."""
    from safetensors.torch import load_file

    def exported() -> dict[str, torch.Tensor]:
        out = tmp_path_factory.mktemp("weights") / "policy"
        group.export(out, "float32")
        return load_file(out / "model.safetensors")

    before = exported()
    old = group.logprobs(trajectories)
    poisoned = [v.clone() for v in old]
    poisoned[5][0] = float("nan")
    got = group.grpo_update(Batch(trajectories, ADVANTAGES, poisoned))
    assert got["skipped_updates"] == 1.0  # the loss was NaN on one rank: both skipped
    assert group.weights_finite()
    after = exported()
    assert all(torch.equal(before[k], after[k]) for k in before)
    clean = group.grpo_update(Batch(trajectories, ADVANTAGES, old))
    assert clean["skipped_updates"] == 0.0
    assert any(not torch.equal(before[k], v) for k, v in exported().items())


def test_skip_guard_stops_after_the_limit_in_a_row():
    from vrag_rl.job.guard import SkipGuard

    guard = SkipGuard(3)
    for skipped in (True, True, False, True, True):
        guard.record(skipped, "here")
    with pytest.raises(FloatingPointError, match="3 optimizer updates in a row .*last at there"):
        guard.record(True, "there")


def test_attention_implementations_agree_and_flash_attention_is_checked_up_front(tiny_dirs, trajectories):
    """eager and SDPA attention give the same log-probs; flash-attention 2 asked for without CUDA or without the
    flash-attn package stops before any model is loaded, saying what is missing."""
    from vrag_rl.learner.policy import check_attention

    batch = trajectories[:4]
    logps = {}
    for attn in ("sdpa", "eager"):
        trainer = one_rank(tiny_dirs["policy"], Objective(), TrainerConfig(attn_implementation=attn))
        assert trainer.model.config._attn_implementation == attn
        logps[attn] = trainer.logprobs(whole(batch))
    for a, b in zip(logps["sdpa"], logps["eager"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    flash = TrainerConfig(attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="runs on CUDA GPUs only"):
        one_rank(tiny_dirs["policy"], Objective(), flash)
    with pytest.raises(ImportError, match="needs the flash-attn package"):  # this machine has no flash-attn
        check_attention("flash_attention_2", "cuda")
    with pytest.raises(ValueError, match="must be one of"):
        TrainerConfig(attn_implementation="flash")
