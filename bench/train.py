"""Trainer benchmark: GRPO step throughput of our trainer against TRL's GRPOTrainer, and weight-sync speed.

    python bench/train.py                      # 4 prompts x 4 samples, 64 new tokens, 5 timed steps per side
    python bench/train.py --policy x16 --no-sync-sizes    # the same at 16M parameters
    python bench/train.py --steps 2 --no-sync-sizes
    python bench/train.py --dtype bfloat16 --no-sync-sizes    # bf16 compute on both sides (AMX / avx512_bf16 CPUs)

Both sides train the same random-weight Qwen2.5-VL policy (``--policy``: the tiny kit's, or a 16M-parameter
variant built the same way) on the same batch: the first ``--prompts`` questions
of the bundled corpus, each one user turn holding its gold page (resized into the tiny image budget) and the
question, rendered by the policy's chat template; ``--samples`` generations per prompt at temperature 1, at most
``--max-new-tokens`` each; GRPO with group-std advantages, PPO clip 0.2 (no dual clip), token-mean loss, no KL
and no reference model, one epoch of one optimizer step, AdamW at lr 1e-5 (constant), grad clip 1, no gradient
checkpointing, compute in ``--dtype`` with float32 weights (bfloat16: vLLM generates in bf16 and our trainer's
forward runs under bf16 autocast; TRL runs with ``bf16=True``, accelerate's bf16 autocast). The reward is the
number of distinct words of a completion / 50: it varies on a random model, so advantages are non-zero and every
step updates. This measures throughput, not learning.

* ours: the vLLM CPU engine generates (per-request seeds), ``LocalTrainer`` (one in-process ``PolicyTrainer``)
  updates, taking the old log-probs from the update's own forward (``algo.old_logprobs=update``; ``--old-logprobs
  recompute`` runs the separate pass instead) and running its vision tower once per distinct image of a
  micro-batch (a group's samples share their prompt's page), then its weights go into the engine in-process
  (``full_parameters`` -> ``update_weights``; no Ray actors or buckets, unlike the main job's rollout pool).
* TRL: ``GRPOTrainer`` with transformers ``generate`` (``use_vllm=False``); with one iteration it also takes the
  old log-probs from the update's own forward; its vision tower runs once per sample.

The update's achieved FLOP/s is an estimate: 6 FLOPs per weight per token it touches (forward and backward:
each language-model layer weight per sequence token, each vision weight per patch of each distinct image, the
output head per response token only, as our forward computes it), attention's score products left out; it is set
against the machine's matrix-multiply peak in ``--dtype``, measured in the same run.

Each side runs in its own subprocess, one after the other, with one untimed warm-up step and ``--steps`` timed
steps; a step is timed whole (TRL: from one ``on_step_end`` to the next). Reported per side: seconds per step,
generated tokens per step, generated tokens/s and, for ours, the phase split; then ours / TRL in tokens/s.
The ours-subprocess also times ``update_weights`` (median of 3) for the tiny policy and two larger variants
(~4x and ~16x the bytes). Results go to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vrag_rl  # noqa: E402,F401  (torchvision shim first)
from bench.machine import machine, matmul_peak  # noqa: E402
from vrag_rl.agent.images import fit_to_budget  # noqa: E402
from vrag_rl.data.expert import load_page  # noqa: E402
from vrag_rl.data.paths import BUNDLED_CORPUS, cache_dir  # noqa: E402
from vrag_rl.data.records import load_qa  # noqa: E402
from vrag_rl.models.tiny import TINY_BUDGET, TinyConfig, build_tiny_models  # noqa: E402

LR, CLIP, TEMPERATURE = 1e-5, 0.2, 1.0
PHASES = ("generate", "logprobs", "update", "sync")  # ours; generate includes prompt encoding and reward
# Larger policies for the weight-sync curve: ~3.7x and ~17x the tiny policy's 3.8 MB.
SYNC_SIZES = {
    "tiny": TinyConfig(seed=0),
    "x4": TinyConfig(seed=0, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8, num_kv_heads=4),
    "x16": TinyConfig(seed=0, hidden_size=512, intermediate_size=1024, num_layers=6, num_heads=16, num_kv_heads=8),
}


def policy_dir(name: str) -> str:
    return str(
        build_tiny_models(cache_dir() / ("tiny" if name == "tiny" else f"tiny-{name}"), SYNC_SIZES[name])["policy"]
    )


def workload(args) -> tuple[str, list[tuple]]:
    """The policy directory and (image as shown, question) per prompt: the same on both sides."""
    policy = policy_dir(args.policy)
    b = TINY_BUDGET
    pages = [(load_page(BUNDLED_CORPUS, r.gold_pages[0]), r.question) for r in load_qa(BUNDLED_CORPUS)[: args.prompts]]
    return policy, [(fit_to_budget(page, b.min_pixels, b.max_pixels, b.factor), q) for page, q in pages]


def user_turn(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def reward(text: str) -> float:
    return len(set(text.split())) / 50


def run_ours(args) -> dict:
    # No trl / ranx / numba in this process: vLLM CPU fails at start when llvmlite is loaded.
    from transformers import AutoProcessor

    from vrag_rl.agent.chat import ChatEncoder
    from vrag_rl.agent.trajectory import Trajectory
    from vrag_rl.algo.advantages import grpo_advantages
    from vrag_rl.algo.config import AlgoConfig
    from vrag_rl.learner.config import OptimConfig, TrainerConfig
    from vrag_rl.learner.payloads import Batch, Objective
    from vrag_rl.learner.trainer import LocalTrainer
    from vrag_rl.rollout.engine import GenerationRequest, SamplingConfig
    from vrag_rl.rollout.vllm_engine import VLLMConfig, VLLMEngine

    policy, items = workload(args)
    encoder = ChatEncoder(AutoProcessor.from_pretrained(policy))
    # ~300 prompt tokens (a page of at most 256 merged patches, the question, the template) + the completion
    vllm = VLLMConfig(
        dtype=args.dtype,
        max_model_len=1024 + args.max_new_tokens,
        max_images=1,
        kv_cache_memory_bytes=512 << 20,
        enforce_eager=True,
    )
    engine = VLLMEngine(policy, vllm)
    trainer_cfg = TrainerConfig(param_dtype=args.dtype, optim=OptimConfig(lr=LR, warmup_steps=0))
    algo = AlgoConfig(
        prompts_per_step=args.prompts,
        group_size=args.samples,
        clip_low=CLIP,
        clip_high=CLIP,
        dual_clip_c=None,
        kl_coef=0.0,
        old_logprobs=args.old_logprobs,
    )
    trainer = LocalTrainer(trainer_cfg, policy, Objective(algo, TEMPERATURE), args.steps + 1)
    sampling = SamplingConfig(temperature=TEMPERATURE, max_tokens=args.max_new_tokens)
    n = args.prompts * args.samples
    steps = []
    for step in range(args.steps + 1):
        marks = [time.perf_counter()]  # phase boundaries
        prompts = [encoder.prompt(user_turn(q), [image]) for image, q in items]
        group = [prompts[i // args.samples] for i in range(n)]
        requests = [
            GenerationRequest(ids, enc.images, enc.pixel_values, enc.grids, seed=step * n + i)
            for i, (ids, enc) in enumerate(group)
        ]
        gens = engine.generate(requests, sampling)
        trajectories = []
        for (ids, enc), gen in zip(group, gens):
            t = Trajectory()
            t.add_prompt(ids, enc.images, enc.pixel_values, enc.grids)
            t.add_model_turn(gen.token_ids, gen.logprobs)
            trajectories.append(t)
        rewards = torch.tensor([reward(encoder.tokenizer.decode(g.token_ids, skip_special_tokens=True)) for g in gens])
        advantages = grpo_advantages(rewards, [i // args.samples for i in range(n)]).tolist()
        marks.append(time.perf_counter())
        old = trainer.logprobs(trajectories) if algo.old_logprobs == "recompute" else None
        marks.append(time.perf_counter())
        trainer.grpo_update(Batch(trajectories, advantages, old))
        trainer.end_step()
        marks.append(time.perf_counter())
        nbytes = engine.update_weights(trainer.policy.full_parameters())
        marks.append(time.perf_counter())
        phases = {k: b - a for k, a, b in zip(PHASES, marks, marks[1:])}
        steps.append(
            {
                "seconds": marks[-1] - marks[0],
                "tokens": sum(len(g.token_ids) for g in gens),
                "phases": phases,
                "sync_bytes": nbytes,
                "update_flops": update_flops(trainer.policy.model, trajectories),
            }
        )
    engine.close()
    out = summarize(steps[1:]) | prompt_record([ids for ids, _ in prompts]) | {"threads": torch.get_num_threads()}
    out["phases"] = {k: statistics.mean(s["phases"][k] for s in steps[1:]) for k in PHASES}
    out["update_gflops"] = statistics.mean(s["update_flops"] / s["phases"]["update"] for s in steps[1:]) / 1e9
    out["parameters"] = sum(p.numel() for p in trainer.policy.model.parameters())
    if args.sync_sizes:
        out["weight_sync"] = [sync_speed(name, vllm, trainer_cfg) for name in SYNC_SIZES]
    return out


def update_flops(model, trajectories) -> float:
    """6 FLOPs per weight per token it touches (see the module docstring)."""
    from vrag_rl.learner.batch import distinct_images

    language = model.model.language_model
    layers = sum(p.numel() for p in language.parameters()) - language.embed_tokens.weight.numel()
    vision = sum(p.numel() for p in model.model.visual.parameters())
    head = model.lm_head.weight.numel()
    tokens = sum(len(t) for t in trajectories)
    # The vision tower runs once per distinct image of a micro-batch (here the batch fits in one).
    patches = sum(p.shape[0] for p in distinct_images([p for t in trajectories for p in t.pixel_values])[0])
    responses = sum(sum(t.response_mask) for t in trajectories)
    return 6.0 * (layers * tokens + vision * patches + head * responses)


def sync_speed(name: str, vllm, trainer_cfg) -> dict:
    """Median of 3 ``update_weights`` from a fresh ``LocalTrainer`` into a fresh engine of the same model."""
    from vrag_rl.learner.payloads import Objective
    from vrag_rl.learner.trainer import LocalTrainer
    from vrag_rl.rollout.vllm_engine import VLLMEngine

    model_dir = policy_dir(name)
    engine, trainer = VLLMEngine(model_dir, vllm), LocalTrainer(trainer_cfg, model_dir, Objective(), 1)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        nbytes = engine.update_weights(trainer.policy.full_parameters())
        times.append(time.perf_counter() - t0)
    engine.close()
    seconds = statistics.median(times)
    return {"model": name, "bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9}


def run_trl(args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages

    from vrag_rl.models.forward import banned_token_ids

    policy, items = workload(args)
    processor = AutoProcessor.from_pretrained(policy)
    # The image in its own column, the prompt holding its placeholder: datasets would store an image inside the
    # prompt as encoded bytes, which TRL does not decode; TRL puts the column's image into the placeholder.
    data = Dataset.from_list([{"prompt": user_turn(q), "image": image} for image, q in items])
    tokens: list[int] = []

    def distinct_words(completions, completion_ids, **_):
        tokens.append(sum(len(c) for c in completion_ids))  # one call per step: one generation batch per step
        return [reward(c[0]["content"]) for c in completions]

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(args.result.parent / "trl"),
        per_device_train_batch_size=args.prompts * args.samples,
        num_generations=args.samples,
        max_completion_length=args.max_new_tokens,
        temperature=TEMPERATURE,
        beta=0.0,
        loss_type="dapo",
        num_iterations=1,
        epsilon=CLIP,
        learning_rate=LR,
        lr_scheduler_type="constant",
        gradient_checkpointing=False,
        bf16=args.dtype == "bfloat16",
        use_cpu=True,
        use_vllm=False,
        max_steps=args.steps + 1,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        # the vision placeholders, as our engine's allowed_token_ids: a sampled <|image_pad|> breaks the forward
        generation_kwargs={"suppress_tokens": banned_token_ids(processor.tokenizer)},
    )
    model = AutoModelForImageTextToText.from_pretrained(policy, dtype=torch.float32)
    clock = Clock()
    GRPOTrainer(
        model=model,
        reward_funcs=distinct_words,
        args=config,
        train_dataset=data,
        processing_class=processor,
        callbacks=[clock],
    ).train()
    # As TRL renders them: the check that both sides saw the same prompts.
    messages = [prepare_multimodal_messages(row["prompt"], [row["image"]]) for row in data]
    rendered = [
        processor.apply_chat_template(conversation=[m], add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ][0]
        for m in messages
    ]
    steps = [{"seconds": b - a, "tokens": n} for a, b, n in zip(clock.ends, clock.ends[1:], tokens[1:])]
    return summarize(steps) | prompt_record(rendered) | {"threads": torch.get_num_threads()}


def prompt_record(prompts: list[list[int]]) -> dict:
    """Prompt lengths and a digest of the ids: both sides must have trained on the same token sequences."""
    ids = json.dumps([list(map(int, p)) for p in prompts]).encode()
    return {"prompt_tokens": [len(p) for p in prompts], "prompt_sha1": hashlib.sha1(ids).hexdigest()}


def summarize(steps: list[dict]) -> dict:
    seconds = statistics.mean(s["seconds"] for s in steps)
    tokens = statistics.mean(s["tokens"] for s in steps)
    return {"step_seconds": seconds, "tokens_per_step": tokens, "tokens_per_s": tokens / seconds, "steps": steps}


def run_side(side: str, args) -> dict:
    """One side in a fresh interpreter (no shared thread pools or memory); its log goes to a file."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        cmd = [
            sys.executable,
            __file__,
            "--side",
            side,
            "--result",
            str(result),
            "--prompts",
            str(args.prompts),
            "--samples",
            str(args.samples),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--steps",
            str(args.steps),
            "--sync-sizes" if args.sync_sizes else "--no-sync-sizes",
            "--policy",
            args.policy,
            "--old-logprobs",
            args.old_logprobs,
            "--dtype",
            args.dtype,
        ]
        t0 = time.perf_counter()
        with log.open("w") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if code:
            sys.exit(f"{side} side failed ({code}); its log ends:\n" + "".join(log.read_text().splitlines(True)[-40:]))
        print(f"{side}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side, after one warm-up step")
    p.add_argument(
        "--sync-sizes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time weight sync for the tiny policy and two larger variants",
    )
    p.add_argument("--policy", choices=tuple(SYNC_SIZES), default="tiny", help="x16: 16M parameters")
    p.add_argument("--old-logprobs", choices=("update", "recompute"), default="update")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype, both sides")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("train-results.json"))
    p.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.side:
        args.result.write_text(json.dumps((run_ours if args.side == "ours" else run_trl)(args)))
        return
    t0 = time.perf_counter()
    peak = matmul_peak(getattr(torch, args.dtype))
    ours, trl = run_side("ours", args), run_side("trl", args)
    settings = {k: v for k, v in vars(args).items() if k not in ("side", "result")} | {"out": str(args.out)}
    report = {
        "machine": machine(),
        "settings": settings,
        "ours": ours,
        "trl": trl,
        "ratio_tokens_per_s": ours["tokens_per_s"] / trl["tokens_per_s"],
        "peak_gflops": peak,  # in args.dtype
        "update_of_peak": ours["update_gflops"] / peak,
        "same_prompts": ours["prompt_sha1"] == trl["prompt_sha1"],
    }
    n = args.prompts * args.samples
    print(
        f"\n{n} generations per step ({args.prompts} prompts x {args.samples}), at most {args.max_new_tokens} "
        f"new tokens, {args.steps} timed steps; prompt tokens {ours['prompt_tokens']}"
    )
    print("| trainer | s/step | gen tokens/step | gen tokens/s | generate | log-probs | update | weight sync |")
    print("|---|---|---|---|---|---|---|---|")
    ph = ours["phases"]
    print(
        f"| ours (vLLM + LocalTrainer) | {ours['step_seconds']:.2f} | {ours['tokens_per_step']:.0f} | "
        f"{ours['tokens_per_s']:.0f} | {ph['generate']:.2f} s | {ph['logprobs']:.2f} s | {ph['update']:.2f} s | "
        f"{ph['sync']:.3f} s |"
    )
    print(
        f"| TRL GRPOTrainer | {trl['step_seconds']:.2f} | {trl['tokens_per_step']:.0f} | {trl['tokens_per_s']:.0f} "
        "| | | | |"
    )
    print(f"ours / TRL (tokens/s): {report['ratio_tokens_per_s']:.2f}x")
    print(
        f"{args.policy} policy, {ours['parameters'] / 1e6:.1f}M parameters: our update at about "
        f"{ours['update_gflops']:.1f} GFLOP/s = {100 * report['update_of_peak']:.0f}% of the {args.dtype} "
        f"peak, {peak:.0f}"
    )
    if not report["same_prompts"]:
        print("WARNING: the two sides' prompt ids differ; the workloads are not the same")
    if args.sync_sizes:
        print("\n| policy | MB | update_weights s (median of 3) | GB/s |\n|---|---|---|---|")
        for s in ours["weight_sync"]:
            print(f"| {s['model']} | {s['bytes'] / 1e6:.1f} | {s['seconds']:.3f} | {s['gb_per_s']:.3f} |")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
