"""The warm-started policy follows the protocol on held-out questions: search, then a valid crop, then answer.

Each turn is decoded greedily from the expert's own context up to that turn, so one bad turn does not hide
the next. Exact answers are not expected: a tiny model cannot read pages, only act by the protocol. A few
minutes of training leave it garbling an unseen entity name now and then, so the bar per turn is 80% of the
held-out questions, with the failures named.
"""

import pytest
import torch

from tests.conftest import CACHE
from vrag_rl.agent.actions import parse_action
from vrag_rl.agent.chat import ChatEncoder
from vrag_rl.agent.images import crop_view, page_view
from vrag_rl.agent.trajectory import ROLE_MODEL, ROLE_OBSERVATION, ROLE_PROMPT, Trajectory
from vrag_rl.data.expert import load_page, scripted_trajectory
from vrag_rl.data.records import holdout_split, load_qa
from vrag_rl.job.warm import WarmConfig, build_warm_policy

CFG = WarmConfig()


@pytest.fixture(scope="module")
def warm_dir(warm_policy):
    return warm_policy


@pytest.fixture(scope="module")
def warm(warm_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(warm_dir)
    model = AutoModelForImageTextToText.from_pretrained(warm_dir, dtype=torch.float32).eval()
    return model, ChatEncoder(processor)


@pytest.fixture(scope="module")
def held_out(bundled_corpus, warm):
    """(record, page, expert trajectory) of every held-out question."""
    _, encoder = warm
    train, held = holdout_split(load_qa(bundled_corpus), CFG.holdout_every)
    held = [r for r in held if r.answer_box is not None]
    assert held and not {r.qid for r in held} & {r.qid for r in train}
    out = []
    for record in held:
        page = load_page(bundled_corpus, record.answer_box[0])
        expert = scripted_trajectory(record, page, encoder, "expert", budget=CFG.budget, max_length=CFG.max_length)
        assert [a.kind for a in expert.actions] == ["search", "bbox", "answer"]
        out.append((record, page, expert.trajectory))
    return out


def prefix(full: Trajectory, num_segments: int) -> Trajectory:
    """The first ``num_segments`` segments of ``full``, with their images."""
    out, image = Trajectory(), 0
    for segment in full.segments[:num_segments]:
        n = segment.num_images
        images = (
            full.images[image : image + n],
            full.pixel_values[image : image + n],
            full.image_grid_thw[image : image + n],
        )
        image += n
        if segment.role == ROLE_PROMPT:
            out.add_prompt(segment.ids, *images)
        elif segment.role == ROLE_MODEL:
            out.add_model_turn(segment.ids)
        else:
            assert segment.role == ROLE_OBSERVATION
            out.add_observation(segment.ids, *images)
    return out


def greedy_turn(warm, context: Trajectory) -> str:
    model, encoder = warm
    inputs = context.model_inputs(encoder.image_token_id)
    eos = [encoder.eos_token_id, encoder.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=96, do_sample=False, eos_token_id=eos)
    return encoder.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def assert_mostly(failures: list, held_out: list) -> None:
    assert len(failures) <= len(held_out) // 5, failures


def test_first_turn_is_a_search(warm, held_out):
    # Segments: prompt
    texts = [(record.qid, greedy_turn(warm, prefix(expert, 1))) for record, _, expert in held_out]
    assert_mostly([(q, t) for q, t in texts if parse_action(t).kind != "search"], held_out)


def test_crops_a_valid_box_of_the_shown_page(warm, held_out):
    # Segments: prompt, search turn, page observation
    failures = []
    for record, page, expert in held_out:
        text = greedy_turn(warm, prefix(expert, 3))
        action = parse_action(text)
        view = page_view(record.answer_box[0], page.size, CFG.budget)
        assert expert.images[0].size == view.shown_size
        if action.kind != "bbox" or isinstance(crop_view(view, action.bbox, page, CFG.budget), str):
            failures.append((record.qid, text))
    assert_mostly(failures, held_out)


def test_answers_after_the_crop(warm, held_out):
    # Segments: prompt, search turn, page observation, crop turn, crop observation
    texts = [(record.qid, greedy_turn(warm, prefix(expert, 5))) for record, _, expert in held_out]
    assert_mostly([(q, t) for q, t in texts if parse_action(t).kind != "answer"], held_out)


def test_loads_like_the_tiny_policy(warm_dir, tiny_dirs):
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (warm_dir / name).read_bytes() == (tiny_dirs["policy"] / name).read_bytes(), name


def test_second_build_reuses_the_cache(warm_dir, tiny_dirs, bundled_corpus):
    weights = warm_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = build_warm_policy(tiny_dirs["policy"], bundled_corpus, CACHE / "warm", CFG)
    assert again == warm_dir and weights.stat().st_mtime_ns == mtime


def test_refuses_to_replace_a_foreign_directory(tmp_path, tiny_dirs, bundled_corpus):
    (tmp_path / "notes.txt").write_text("not a policy")
    with pytest.raises(FileExistsError):
        build_warm_policy(tiny_dirs["policy"], bundled_corpus, tmp_path, CFG)
    with pytest.raises(ValueError):
        WarmConfig(steps=0)
