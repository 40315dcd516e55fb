"""The trajectory record against the processor (token ids) and the policy (log-probs).

What (a) compares, precisely: assistant turns are given as the canonical tokenization of their text plus
<|im_end|> (what a sampler emits when it reproduces the tokenizer's own segmentation). The trajectory's ids
must then equal, token for token, the processor's encoding of the same conversation rendered by the chat
template, including every expanded <|image_pad|> run; so must the images' pixel values, patch grids and the
image-token type ids. Sampled ids that are not canonical are kept as sampled and are, by design, not
comparable to a re-encoding.
"""

import random

import pytest
import torch
from PIL import Image

from vrag_rl.agent.chat import ChatEncoder
from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.models.forward import token_logprobs

FEEDBACK = "Your previous action is invalid. Use <search>, <bbox> or <answer>."
WORDS = "revenue table chart zoom page 2021 answer the of million growth <think> </think> [12, 40, 99, 120]".split()


def random_image(rng: random.Random) -> Image.Image:
    # sides are multiples of 28 inside the processor's pixel bounds: shown exactly as given
    w, h = 28 * rng.randint(2, 6), 28 * rng.randint(2, 6)
    return Image.frombytes("RGB", (w, h), bytes(rng.getrandbits(8) for _ in range(w * h * 3)))


def random_assistant_text(rng: random.Random) -> str:
    action = rng.choice(["search", "bbox", "answer"])
    body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
    return f"<think>{body}</think>\n<{action}>{body}</{action}>"


def build_conversation(encoder, rng, num_turns, num_images, end_with_observation):
    """Returns (trajectory, chat messages, images) for one scripted conversation."""
    tok = encoder.tokenizer
    messages = [{"role": "user", "content": [{"type": "text", "text": "Which year had the highest revenue?"}]}]
    traj = Trajectory()
    ids, enc = encoder.prompt(messages)
    traj.add_prompt(ids)
    # spread the images over the observation turns (an observation is an image or a feedback text)
    num_obs = num_turns - 1 + int(end_with_observation)
    per_obs = [0] * num_obs
    for _ in range(num_images):
        per_obs[rng.randrange(num_obs)] += 1
    images = []
    for turn in range(num_turns):
        text = random_assistant_text(rng)
        sampled = tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        traj.add_model_turn(sampled, logprobs=[-1.0] * len(sampled))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        if turn < num_obs:
            obs_images = [random_image(rng) for _ in range(per_obs[turn])]
            feedback = None if obs_images else FEEDBACK
            ids, enc = encoder.observation(obs_images, feedback)
            traj.add_observation(ids, enc.images, enc.pixel_values, enc.grids)
            content = [{"type": "image"} for _ in obs_images] + (
                [{"type": "text", "text": feedback}] if feedback else []
            )
            messages.append({"role": "user", "content": content})
            images += obs_images
    return traj, messages, images


@pytest.mark.parametrize("seed", range(12))
def test_trajectory_ids_equal_processor_encoding(tiny_processor, seed):
    rng = random.Random(seed)
    encoder = ChatEncoder(tiny_processor)
    num_turns, end_with_obs = rng.randint(1, 5), rng.random() < 0.5
    num_images = rng.randint(0, 4) if (num_turns - 1 + end_with_obs) > 0 else 0
    traj, messages, images = build_conversation(encoder, rng, num_turns, num_images, end_with_obs)

    text = tiny_processor.apply_chat_template(messages, add_generation_prompt=end_with_obs, tokenize=False)
    ref = tiny_processor(text=[text], images=images or None, return_tensors="pt")
    ids = traj.input_ids
    if not end_with_obs:  # the template closes the last assistant turn with "<|im_end|>\n"
        ids = ids + encoder.turn_separator_ids
    assert ids == ref["input_ids"][0].tolist()
    assert len(traj.images) == num_images
    inputs = traj.model_inputs(encoder.image_token_id)
    assert inputs["mm_token_type_ids"][0].tolist() == ref["mm_token_type_ids"][0, : len(traj)].tolist()
    if images:
        assert torch.equal(inputs["pixel_values"], ref["pixel_values"])
        assert torch.equal(inputs["image_grid_thw"], ref["image_grid_thw"])

    # the response mask covers exactly the sampled assistant ids
    mask = traj.response_mask
    sampled = [i for i, m in zip(traj.input_ids, mask) if m]
    expected = [i for s in traj.segments if s.role == "model" for i in s.ids]
    assert sampled == expected and sum(mask) == len(expected)
    assert tiny_processor.tokenizer.decode(sampled).count("<|im_end|>") == num_turns


def _generate_turn(model, traj, encoder, max_new_tokens, generator_seed):
    inputs = traj.model_inputs(encoder.image_token_id)
    torch.manual_seed(generator_seed)
    out = model.generate(
        **inputs,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=encoder.eos_token_id,
    )
    new = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    logits = torch.stack(out.logits, dim=1)[0, : len(new)].float()
    logprobs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(new)[:, None])[:, 0]
    return new, logprobs.tolist()


def test_recomputed_logprobs_match_generate(tiny_processor, tiny_policy):
    """Log-probs recorded while sampling with HF generate, turn by turn with images arriving between turns,
    equal a single forward over the whole recorded sequence with mRoPE positions from get_rope_index."""
    rng = random.Random(7)
    encoder = ChatEncoder(tiny_processor)
    traj = Trajectory()
    messages = [{"role": "user", "content": [{"type": "text", "text": "What was the revenue in 2021?"}]}]
    traj.add_prompt(encoder.prompt(messages)[0])
    for turn in range(4):
        ids, logprobs = _generate_turn(tiny_policy, traj, encoder, max_new_tokens=12, generator_seed=turn)
        assert traj.add_model_turn(ids, logprobs)
        obs_images = [random_image(rng) for _ in range(turn % 3)]  # 0, 1, 2, 0 images
        ids, enc = encoder.observation(
            obs_images, None if obs_images else FEEDBACK, close_turn=ids[-1] != encoder.eos_token_id
        )
        assert traj.add_observation(ids, enc.images, enc.pixel_values, enc.grids)
    assert len(traj.images) == 3

    with torch.no_grad():
        recomputed = token_logprobs(tiny_policy, traj.model_inputs(encoder.image_token_id))[0]
    mask = torch.tensor(traj.response_mask, dtype=torch.bool)
    recorded = torch.tensor([lp for lp, m in zip(traj.sampled_logprobs, mask) if m])
    assert mask.sum() == sum(len(s.ids) for s in traj.segments if s.role == "model")
    torch.testing.assert_close(recomputed[mask], recorded, atol=1e-4, rtol=0)

    # 1-D positions (the common fallback) do not reproduce what the sampler saw: the check above can fail
    inputs = traj.model_inputs(encoder.image_token_id)
    with torch.no_grad():
        logits = tiny_policy(**inputs, position_ids=torch.arange(len(traj))[None], use_cache=False).logits[0, :-1]
    flat = torch.log_softmax(logits, -1).gather(-1, inputs["input_ids"][0, 1:, None])[:, 0]
    assert (flat[mask[1:]] - recorded).abs().max() > 1e-3


def test_length_limit_never_cuts_an_image(tiny_processor):
    encoder = ChatEncoder(tiny_processor)
    tok = tiny_processor.tokenizer
    prompt_ids, _ = encoder.prompt([{"role": "user", "content": [{"type": "text", "text": "Find the chart."}]}])
    turn = tok("<search>chart</search><|im_end|>", add_special_tokens=False)["input_ids"]
    image = Image.new("RGB", (28 * 4, 28 * 4), (255, 255, 255))  # 16 image tokens
    obs_ids, enc = encoder.observation([image])
    limit = len(prompt_ids) + len(turn) + len(obs_ids) - 1  # one token short of holding the image turn

    traj = Trajectory(max_length=limit)
    assert traj.add_prompt(prompt_ids) and traj.add_model_turn(turn)
    assert traj.room() == len(obs_ids) - 1
    assert not traj.add_observation(obs_ids, enc.images, enc.pixel_values, enc.grids)
    assert traj.truncated and len(traj) == len(prompt_ids) + len(turn)
    assert encoder.image_token_id not in traj.input_ids and not traj.images
    assert not traj.add_model_turn(turn[:1])  # nothing is appended after truncation

    exact = Trajectory(max_length=limit + 1)  # the same pieces fit exactly
    assert exact.add_prompt(prompt_ids) and exact.add_model_turn(turn)
    assert exact.add_observation(obs_ids, enc.images, enc.pixel_values, enc.grids)
    assert exact.room() == 0 and not exact.truncated
    assert exact.input_ids.count(encoder.image_token_id) == enc.num_tokens[0] == 16
