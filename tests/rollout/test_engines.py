"""The two engines against each other and against the training forward.

Contexts are real multi-turn prefixes with images: an expert trajectory over a bundled page, cut after its
page observation (one image) and after its crop observation (two images). The vLLM engine runs inside a
Ray actor, as in rollout workers (its own process; see vllm_engine's docstring for why).

Tolerances: on CPU in float32, vLLM's and transformers' log-probs of the same tokens agree to ~1e-6; the
tests allow 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from tests.rollout.conftest import TINY_BUDGET
from vrag_rl.agent.trajectory import Trajectory
from vrag_rl.data.expert import load_page, scripted_trajectory
from vrag_rl.data.records import load_qa
from vrag_rl.models.forward import banned_token_ids, token_logprobs
from vrag_rl.rollout.engine import REFUSED, GenerationRequest, SamplingConfig, generate_apart
from vrag_rl.rollout.hf_engine import HFEngine
from vrag_rl.rollout.vllm_engine import VLLMConfig

LOGPROB_TOL = 1e-4
VLLM_CPU = VLLMConfig(
    dtype="float32", max_model_len=4096, max_images=4, kv_cache_memory_bytes=64 << 20, enforce_eager=True
)


def prefix_request(traj: Trajectory, observations: int, **kw) -> GenerationRequest:
    """The trajectory up to (and including) its n-th observation, as a generation request."""
    segs, seen = [], 0
    for s in traj.segments:
        segs.append(s)
        seen += s.role == "observation"
        if seen == observations:
            break
    n_images = sum(s.num_images for s in segs)
    ids = [i for s in segs for i in s.ids]
    return GenerationRequest(
        ids, traj.images[:n_images], traj.pixel_values[:n_images], traj.image_grid_thw[:n_images], **kw
    )


@pytest.fixture(scope="module")
def contexts(bundled_corpus, encoder):
    record = next(r for r in load_qa(bundled_corpus) if r.answer_box is not None)
    traj = scripted_trajectory(
        record, load_page(bundled_corpus, record.answer_box[0]), encoder, "expert", budget=TINY_BUDGET
    ).trajectory
    return [prefix_request(traj, 0), prefix_request(traj, 1), prefix_request(traj, 2)]


@pytest.fixture(scope="module")
def hf(tiny_dirs):
    return HFEngine(str(tiny_dirs["policy"]), dtype="float32")


@pytest.fixture(scope="module")
def vllm_engine(ray_session, tiny_dirs):
    import ray

    from vrag_rl.rollout.vllm_engine import VLLMEngine

    actor = ray.remote(VLLMEngine).options(num_cpus=1).remote(str(tiny_dirs["policy"]), VLLM_CPU)
    yield actor
    ray.kill(actor)


def recomputed(model, request: GenerationRequest, new_ids: list[int], encoder, temperature: float):
    traj = Trajectory()
    traj.add_prompt(request.prompt_ids, request.images, request.pixel_values, request.image_grid_thw)
    traj.add_model_turn(new_ids)
    with torch.no_grad():
        inputs = traj.model_inputs(encoder.image_token_id)
        return token_logprobs(model, inputs, temperature, banned_token_ids(encoder.tokenizer))[
            0, len(request.prompt_ids) :
        ]


def test_hf_logprobs_are_the_training_forward(hf, contexts, encoder):
    sampling = SamplingConfig(temperature=0.8, max_tokens=24)
    for request in contexts:
        request.seed = 11
        (gen,) = hf.generate([request], sampling)
        again = recomputed(hf.model, request, gen.token_ids, encoder, 0.8)
        assert torch.allclose(torch.tensor(gen.logprobs), again, atol=LOGPROB_TOL)
        assert hf.generate([request], sampling)[0].token_ids == gen.token_ids  # same seed, same sample


def test_vllm_greedy_equals_hf_greedy(vllm_engine, hf, contexts):
    import ray

    greedy = SamplingConfig(temperature=0.0, max_tokens=16)
    got = ray.get(vllm_engine.generate.remote(contexts, greedy))
    want = hf.generate(contexts, greedy)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=LOGPROB_TOL)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_sampled_logprobs_match_recomputed(vllm_engine, hf, contexts, encoder, temperature):
    import ray

    sampling = SamplingConfig(temperature=temperature, max_tokens=32)
    requests = [
        GenerationRequest(c.prompt_ids, c.images, c.pixel_values, c.image_grid_thw, seed=s)
        for c in contexts
        for s in (1, 2)
    ]
    gens = ray.get(vllm_engine.generate.remote(requests, sampling))
    assert gens[0].token_ids != gens[1].token_ids  # different seeds, different samples
    again = ray.get(vllm_engine.generate.remote(requests[:2], sampling))
    assert [g.token_ids for g in again] == [g.token_ids for g in gens[:2]]  # the seed fixes the sample
    for request, gen in zip(requests, gens):
        want = recomputed(hf.model, request, gen.token_ids, encoder, temperature)
        assert len(gen.logprobs) == len(gen.token_ids)
        assert (torch.tensor(gen.logprobs) - want).abs().max().item() < LOGPROB_TOL


def test_seeded_batch_larger_than_one_scheduler_step(vllm_engine, contexts):
    """More prompt tokens than one step takes: a seeded sample must not depend on how requests were batched
    (on CPU, chunked prefill of a seeded request used to fail inside vLLM)."""
    import ray

    sampling = SamplingConfig(temperature=1.0, max_tokens=8)
    # Distinct first tokens: no shared cached prefix, so every prompt is computed in full.
    requests = [
        GenerationRequest([100 + s] + c.prompt_ids, c.images, c.pixel_values, c.image_grid_thw, seed=s)
        for s in range(8)
        for c in contexts
    ]
    assert sum(len(r.prompt_ids) for r in requests) > max(VLLM_CPU.max_model_len, 8192)
    gens = ray.get(vllm_engine.generate.remote(requests, sampling))
    alone = ray.get(vllm_engine.generate.remote(requests[-1:], sampling))
    assert len(gens) == len(requests) and gens[-1].token_ids == alone[0].token_ids


def test_requests_joining_a_running_batch_sample_what_they_sample_in_one_batch(vllm_engine, contexts):
    """Continuous batching (``advance``): seeded requests added one per scheduler step, while the earlier ones
    decode, sample the same tokens with the same log-probs as all of them in one ``generate``; a request vLLM
    refuses comes back at once as an error turn."""
    import ray

    sampling = SamplingConfig(temperature=1.0, max_tokens=12)
    requests = [
        GenerationRequest(c.prompt_ids, c.images, c.pixel_values, c.image_grid_thw, seed=s)
        for s in range(3)
        for c in contexts
    ]
    too_long = GenerationRequest(contexts[0].prompt_ids * (VLLM_CPU.max_model_len // len(contexts[0].prompt_ids) + 1))
    together = ray.get(vllm_engine.generate.remote(requests, sampling))
    waiting, got, steps = list(enumerate(requests)) + [("refused", too_long)], {}, 0
    while len(got) < len(requests) + 1:
        new, waiting = waiting[:1], waiting[1:]
        got |= dict(ray.get(vllm_engine.advance.remote(new, sampling)))
        steps += 1
    assert steps > len(requests) + 1  # requests joined while others were decoding
    assert got["refused"].finish_reason == "error" and got["refused"].error.startswith(REFUSED)
    for i, want in enumerate(together):
        assert got[i].token_ids == want.token_ids and got[i].finish_reason == want.finish_reason, i
        assert torch.allclose(torch.tensor(got[i].logprobs), torch.tensor(want.logprobs), atol=LOGPROB_TOL), i
    assert (
        ray.get(vllm_engine.advance.remote([], sampling)) == []
        and ray.get(vllm_engine.generate.remote([], sampling)) == []
    )


def test_an_aborted_request_leaves_the_running_batch(vllm_engine, contexts):
    """A turn taken out of the engine (a trajectory's turn timed out) never comes back; the others finish."""
    import ray

    sampling = SamplingConfig(temperature=1.0, max_tokens=64)
    a, b = (
        GenerationRequest(
            contexts[0].prompt_ids, contexts[0].images, contexts[0].pixel_values, contexts[0].image_grid_thw, seed=s
        )
        for s in (0, 1)
    )
    assert ray.get(vllm_engine.advance.remote([("a", a), ("b", b)], sampling)) == []  # both under way
    ray.get(vllm_engine.abort.remote("a"))
    finished, steps = [], 0
    while not finished and steps < 200:
        finished += ray.get(vllm_engine.advance.remote([], sampling))
        steps += 1
    assert [key for key, _ in finished] == ["b"]
    assert ray.get(vllm_engine.advance.remote([], sampling)) == []  # nothing is left running


def test_a_request_vllm_refuses_fails_alone(vllm_engine, contexts):
    """A prompt longer than the model's context in a batch: vLLM refuses it (``ValueError``), and the others of
    the batch get what they get alone."""
    import ray

    class Actor:  # the engine actor, called as an engine
        def generate(self, requests, sampling):
            return ray.get(vllm_engine.generate.remote(requests, sampling))

    greedy = SamplingConfig(temperature=0.0, max_tokens=8)
    too_long = GenerationRequest(contexts[0].prompt_ids * (VLLM_CPU.max_model_len // len(contexts[0].prompt_ids) + 1))
    with pytest.raises(ValueError):
        Actor().generate([too_long, contexts[1]], greedy)
    alone = Actor().generate(contexts[1:], greedy)
    refused, kept = generate_apart(Actor(), [too_long, contexts[1]], greedy)
    assert refused.finish_reason == "error" and refused.token_ids == [] and refused.error.startswith(REFUSED)
    assert kept.token_ids == alone[0].token_ids and kept.finish_reason != "error"


def perturbed_state(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """New values for every parameter; tied weights (the output head) appear once, as the trainer sends them."""
    g = torch.Generator().manual_seed(seed)
    return {k: v.detach() + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.named_parameters()}


def test_update_weights_then_greedy_equals_hf(vllm_engine, contexts, tiny_dirs):
    """Runs last in this module: it changes the engine's weights."""
    import ray

    fresh = HFEngine(str(tiny_dirs["policy"]), dtype="float32")
    greedy = SamplingConfig(temperature=0.0, max_tokens=16)
    before = ray.get(vllm_engine.generate.remote(contexts, greedy))
    state = perturbed_state(fresh.model)
    nbytes = fresh.update_weights(state.items())
    assert ray.get(vllm_engine.update_weights.remote(list(state.items()))) == nbytes
    got = ray.get(vllm_engine.generate.remote(contexts, greedy))
    want = fresh.generate(contexts, greedy)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.token_ids for g in got] != [b.token_ids for b in before]
    for g, w in zip(got, want):
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=LOGPROB_TOL)


def test_hf_update_weights_equals_loading(hf, tiny_dirs):
    state = perturbed_state(hf.model, seed=3)
    hf.update_weights(state.items())
    assert all(torch.equal(hf.model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(KeyError):
        hf.update_weights([("no.such.weight", torch.zeros(1))])


def test_vision_placeholders_are_never_sampled(vllm_engine, contexts, tiny_dirs, encoder):
    """Runs last in this module: it changes the engine's weights. The placeholder's output row is made 100x
    the greedy token's, so that without the ban it would be every engine's first choice."""
    import ray

    hf = HFEngine(str(tiny_dirs["policy"]), dtype="float32")
    greedy = SamplingConfig(temperature=0.0, max_tokens=8)
    first = hf.generate(contexts[:1], greedy)[0].token_ids[0]
    name = "model.language_model.embed_tokens.weight"  # tied: also the output head
    table = dict(hf.model.named_parameters())[name].detach().clone()
    table[encoder.image_token_id] = 100 * table[first]
    hf.update_weights([(name, table)])
    ids = torch.tensor([contexts[0].prompt_ids])
    with torch.no_grad():
        logits = hf.model(
            input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.zeros_like(ids)
        ).logits
    assert logits[0, -1].argmax().item() == encoder.image_token_id
    ray.get(vllm_engine.update_weights.remote([(k, v.detach()) for k, v in hf.model.named_parameters()]))
    banned = set(banned_token_ids(encoder.tokenizer))
    assert encoder.image_token_id in banned
    sampled = [
        GenerationRequest(c.prompt_ids, c.images, c.pixel_values, c.image_grid_thw, seed=s)
        for c in contexts
        for s in range(4)
    ]
    for sampling, requests in ((greedy, contexts), (SamplingConfig(temperature=1.0, max_tokens=8), sampled)):
        got = ray.get(vllm_engine.generate.remote(requests, sampling))
        want = hf.generate(requests, sampling)
        assert not banned & {t for g in got + want for t in g.token_ids}
        if sampling.greedy:
            assert [g.token_ids for g in got] == [w.token_ids for w in want]
        for g, w in zip(got, want):
            if g.token_ids == w.token_ids:
                assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=LOGPROB_TOL)
