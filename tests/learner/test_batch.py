"""Padded micro-batches give each trajectory's response tokens exactly the log-probs of its own unpadded forward."""

import torch

from tests.rollout.conftest import TINY_BUDGET
from vrag_rl.agent.chat import ChatEncoder
from vrag_rl.data.expert import load_page, scripted_trajectory
from vrag_rl.data.records import load_qa
from vrag_rl.learner.batch import collate, distinct_images, forward_logprobs, token_budget_batches
from vrag_rl.models.forward import token_logprobs


def test_token_budget_batches():
    assert token_budget_batches([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert token_budget_batches([3, 9, 2], 10) == [[0], [1], [2]]  # padded to 9: two rows would be 18
    assert token_budget_batches([30, 1], 10) == [[0], [1]]  # too long for the budget: alone
    assert sum(token_budget_batches(list(range(1, 40)), 64), []) == list(range(39))
    assert token_budget_batches([2, 2, 2, 9], 100) == [[0, 1, 2], [3]]  # 4 x 9 = 36 padded for 15 real
    assert token_budget_batches([4, 5, 6, 7], 100) == [[0, 1, 2, 3]]


def test_padded_batch_equals_single_forwards(tiny_processor, tiny_policy, bundled_corpus):
    encoder = ChatEncoder(tiny_processor)
    records = [r for r in load_qa(bundled_corpus) if r.answer_box is not None][:3]
    trajectories = [
        scripted_trajectory(r, load_page(bundled_corpus, r.answer_box[0]), encoder, v, budget=TINY_BUDGET).trajectory
        for r, v in zip(records, ["no_search", "expert", "no_crop"])
    ]  # 0, 2 and 1 images, different lengths
    batch = collate(trajectories, encoder.image_token_id, pad_token_id=0)
    distinct = distinct_images([p for t in trajectories for p in t.pixel_values])[0]
    assert batch["pixel_values"].shape[0] == sum(p.shape[0] for p in distinct)
    with torch.no_grad():
        logp, entropy = forward_logprobs(tiny_policy, batch, with_entropy=True)
        for row, t in enumerate(trajectories):
            alone = token_logprobs(tiny_policy, t.model_inputs(encoder.image_token_id))[0]
            response = torch.tensor(t.response_mask, dtype=torch.bool)
            assert torch.equal(batch["response_mask"][row, : len(t)], response.float())
            assert torch.allclose(logp[row, : len(t)][response], alone[response], atol=1e-5)
            assert (entropy[row, : len(t)][response] > 0).all()
            # Prompts, images, tool outputs and padding are outside the loss: 0, not computed.
            assert not logp[row, : len(t)][~response].any() and not entropy[row, : len(t)][~response].any()
            assert not logp[row, len(t) :].any() and not entropy[row, len(t) :].any()


def test_recurring_images_run_the_vision_tower_once_with_the_same_logprobs_and_gradients(
    tiny_dirs, tiny_processor, bundled_corpus
):
    """A group's samples share their pages: collate keeps each distinct image once (equal pixels, not only the
    same tensor), and the forward gives the log-probs and vision-tower gradients of one tower run per image."""
    from transformers import AutoModelForImageTextToText

    encoder = ChatEncoder(tiny_processor)
    record = next(r for r in load_qa(bundled_corpus) if r.answer_box is not None)
    page = load_page(bundled_corpus, record.answer_box[0])
    expert = scripted_trajectory(record, page, encoder, "expert", budget=TINY_BUDGET).trajectory  # page + crop
    no_crop = scripted_trajectory(record, page, encoder, "no_crop", budget=TINY_BUDGET).trajectory  # the page
    trajectories = [expert, no_crop, expert]
    images = [p for t in trajectories for p in t.pixel_values]
    assert no_crop.pixel_values[0] is not expert.pixel_values[0]
    assert distinct_images(images)[1] == [0, 1, 0, 0, 1]
    assert distinct_images([images[0], images[0] + 1e-6])[1] == [0, 1]

    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs["policy"], dtype=torch.float32)
    shared = collate(trajectories, encoder.image_token_id, pad_token_id=0)
    assert shared["image_source"].tolist() == [0, 1, 0, 0, 1]
    assert shared["pixel_values"].shape[0] == images[0].shape[0] + images[1].shape[0]
    each = {k: v for k, v in shared.items() if k != "image_source"} | {"pixel_values": torch.cat(images)}
    results = []
    for batch in (shared, each):
        model.zero_grad()
        logp = forward_logprobs(model, batch)
        logp.sum().backward()
        grads = [p.grad.clone() for p in model.model.visual.parameters()]
        results.append((logp.detach(), grads))
    (logp_shared, grads_shared), (logp_each, grads_each) = results
    assert torch.allclose(logp_shared, logp_each, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads_each)
    for a, b in zip(grads_shared, grads_each):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    model.zero_grad()
    forward_logprobs(model, shared).sum().backward()  # again: bit for bit (exact resume depends on it)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.model.visual.parameters(), grads_shared))


def test_minibatches_keep_groups_whole_and_follow_the_rng():
    import random

    from vrag_rl.learner.batch import minibatches_by_group

    group_ids = [g for g in range(4) for _ in range(3)]  # 4 groups of 3
    parts = minibatches_by_group(group_ids, 2, random.Random(5))
    assert sorted(i for p in parts for i in p) == list(range(12)) and [len(p) for p in parts] == [6, 6]
    assert all(len({group_ids[i] for i in p}) == 2 for p in parts)  # whole groups only
    assert parts == minibatches_by_group(group_ids, 2, random.Random(5))
    orders = {tuple(map(tuple, minibatches_by_group(group_ids, 4, random.Random(s)))) for s in range(6)}
    assert len(orders) > 1  # the seed decides the order


def test_split_over_ranks_gives_each_trajectory_once_with_local_plans():
    from vrag_rl.agent.trajectory import Trajectory
    from vrag_rl.learner.batch import split_over_ranks
    from vrag_rl.learner.payloads import Batch

    trajectories = []
    for n in (50, 7, 30, 12, 40):
        t = Trajectory()
        t.add_prompt(list(range(n)))
        trajectories.append(t)
    advantages = [float(100 + i) for i in range(len(trajectories))]
    shares = split_over_ranks(Batch(trajectories, advantages), 2, 64)
    real = sorted(i for s in shares for ix, w in s.plan if w for i in (s.indices[j] for j in ix))
    assert real == list(range(len(trajectories)))  # every trajectory in exactly one real micro-batch
    assert len(shares[0].plan) == len(shares[1].plan)  # the same number of forwards on every rank
    for s in shares:
        assert s.batch.trajectories == [trajectories[i] for i in s.indices]
        assert s.batch.advantages == [100 + i for i in s.indices]  # each trajectory's values travel with it
        assert s.batch.old_logprobs is None and s.num_tokens == 0  # prompts only: no response tokens
