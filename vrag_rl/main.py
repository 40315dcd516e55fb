"""The main job: ``python -m vrag_rl.main`` (Hydra; override any key on the command line).

Today it runs the foundation pipeline end to end on CPU in a minute or two, with real components only:

1. build the tiny model kit (tokenizer, processor, Qwen2.5-VL policy, ColQwen2 retriever), or reuse it;
2. load the page corpus (default: the bundled synthetic corpus in data/synthetic-small);
3. for each question, script a group of trajectories through the agent protocol: the expert (search,
   crop the printed answer, answer) and flawed variants (no crop, wrong answer, an invalid action first,
   no search), token-in/token-out with images;
4. score them with the reward functions (NDCG, format gate, answer metric);
5. compute GRPO advantages per group, then take PPO-clip updates with a low-variance KL to the
   reference policy on the tiny policy, and measure how the log-likelihood of positively and negatively
   advantaged trajectories moved;
6. write ``trajectories.jsonl``, ``metrics.json`` and the expert's shown images to the run directory.

The rollout engine, retriever and distributed trainer replace the scripted parts of steps 3 and 5 as
they land.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from vrag_rl.agent.chat import ChatEncoder
from vrag_rl.algo.advantages import grpo_advantages
from vrag_rl.algo.losses import aggregate, kl_penalty, policy_loss
from vrag_rl.config import MainConfig
from vrag_rl.data.expert import load_page, scripted_trajectory
from vrag_rl.data.records import load_qa
from vrag_rl.models.forward import token_logprobs
from vrag_rl.models.tiny import TinyConfig, build_tiny_models
from vrag_rl.reward.score import RewardInput, score

log = logging.getLogger("vrag_rl.main")


def run(cfg: MainConfig, out_dir: Path) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    t0 = time.perf_counter()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dirs = build_tiny_models(cfg.models.tiny_dir, TinyConfig(seed=cfg.models.tiny_seed))
    processor = AutoProcessor.from_pretrained(dirs["policy"])
    policy = AutoModelForImageTextToText.from_pretrained(dirs["policy"], dtype=torch.float32)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    encoder = ChatEncoder(processor)
    encoder.check_budget(cfg.budget.min_pixels, cfg.budget.max_pixels)

    # Scripted groups: one per question, one trajectory per variant.
    records = [r for r in load_qa(cfg.demo.corpus) if r.answer_box is not None][: cfg.demo.num_questions]
    if not records:
        raise ValueError(f"no question with an answer box in {cfg.demo.corpus}")
    answers = [r.answer for r in records]
    group = []
    for i, record in enumerate(tqdm(records, desc="trajectories", unit="question")):
        page = load_page(cfg.demo.corpus, record.answer_box[0])
        wrong = answers[(i + 1) % len(answers)] if len(set(answers)) > 1 else record.answer + " not"
        for variant in cfg.demo.variants:
            group.append(scripted_trajectory(record, page, encoder, variant, prompt=cfg.prompt, budget=cfg.budget,
                                             wrong_answer=wrong, max_length=cfg.demo.max_length))  # fmt: skip
    by_qid = {r.qid: r for r in records}

    # Rewards, then group-normalised advantages.
    inputs = [
        RewardInput(
            question=by_qid[s.qid].question, reference=by_qid[s.qid].answer, prediction=s.answer,
            retrieved_pages=s.retrieved_pages, gold_pages=by_qid[s.qid].gold_pages,
            num_searches=sum(a.kind == "search" for a in s.actions), num_actions=len(s.actions),
            num_invalid=sum(a.kind == "invalid" for a in s.actions),
        )  # fmt: skip
        for s in group
    ]
    rewards = score(inputs, cfg.reward, judge=None)
    reward_t = torch.tensor([r.total for r in rewards], dtype=torch.float32)
    advantages = grpo_advantages(reward_t, [s.qid for s in group])

    # GRPO updates on the batch: PPO clip against the sampling policy, k3 KL to the reference.
    batch = [s.trajectory.model_inputs(encoder.image_token_id) for s in group]
    masks = [torch.tensor(s.trajectory.response_mask, dtype=torch.float32)[None] for s in group]
    with torch.no_grad():
        old = [token_logprobs(policy, b) for b in batch]
        ref = [token_logprobs(reference, b) for b in batch]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.demo.lr, weight_decay=0.0)
    total_tokens = sum(m.sum() for m in masks)
    history = []
    policy.train()
    for step in range(cfg.demo.steps):
        optimizer.zero_grad(set_to_none=True)
        stats = {"pg_loss": 0.0, "kl": 0.0, "pg_clipfrac": 0.0}
        for b, m, o, r, a in zip(batch, masks, old, ref, advantages):
            logp = token_logprobs(policy, b)
            # Each trajectory's share of a batch-wide token mean, so accumulated gradients equal one big batch.
            share = m.sum() / total_tokens
            pg, metrics = policy_loss(logp, o, a.expand(1), m, cfg.demo.clip_low, cfg.demo.clip_high,
                                      agg=cfg.demo.loss_agg)  # fmt: skip
            kl = aggregate(kl_penalty(logp, r, cfg.demo.kl_kind), m, "token-mean")
            ((pg + cfg.demo.kl_coef * kl) * share).backward()
            stats["pg_loss"] += (pg * share).item()
            stats["kl"] += (kl * share).item()
            stats["pg_clipfrac"] += float(metrics["pg_clipfrac"] * share)
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0))
        optimizer.step()
        history.append({"step": step + 1, **stats})
        log.info("update %d: %s", step + 1, {k: round(v, 5) for k, v in stats.items()})
    policy.eval()
    with torch.no_grad():
        new = [token_logprobs(policy, b) for b in batch]

    # How the update moved each trajectory's mean per-token log-likelihood.
    deltas = [float(((n - o) * m).sum() / m.sum()) for n, o, m in zip(new, old, masks)]
    pos = [d for d, a in zip(deltas, advantages) if a > 0]
    neg = [d for d, a in zip(deltas, advantages) if a < 0]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "trajectories.jsonl", "w") as f:
        for s, rw, adv, d in zip(group, rewards, advantages.tolist(), deltas):
            f.write(json.dumps({
                "qid": s.qid, "variant": s.variant, "turns": s.texts, "actions": [a.kind for a in s.actions],
                "retrieved_pages": s.retrieved_pages, "crops": s.crops, "answer": s.answer,
                "reference": by_qid[s.qid].answer, "tokens": len(s.trajectory),
                "sampled_tokens": sum(s.trajectory.response_mask), "images": len(s.trajectory.images),
                "reward": rw.total, "ndcg": rw.ndcg, "answer_score": rw.answer, "format": rw.format,
                "gated": rw.gated, "advantage": adv, "logp_delta_per_token": d,
            }) + "\n")  # fmt: skip
    expert = next((s for s in group if s.variant == "expert"), group[0])
    for i, image in enumerate(expert.trajectory.images):
        image.save(out_dir / f"{expert.qid}_shown_{i}.png")
    summary = {
        "questions": len(records), "trajectories": len(group),
        "reward_by_variant": {v: sum(r.total for s, r in zip(group, rewards) if s.variant == v) / len(records)
                              for v in cfg.demo.variants},
        "updates": history,
        "logp_delta_positive_adv": sum(pos) / max(len(pos), 1),
        "logp_delta_negative_adv": sum(neg) / max(len(neg), 1),
        "seconds": time.perf_counter() - t0, "out_dir": str(out_dir),
    }  # fmt: skip
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> None:
    cfg: MainConfig = OmegaConf.to_object(raw)  # runs the dataclasses' value checks
    summary = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    print("\nmean reward by variant:")
    for variant, value in summary["reward_by_variant"].items():
        print(f"  {variant:14s} {value:.3f}")
    print(f"log-likelihood change per token after {len(summary['updates'])} GRPO updates: "
          f"positive advantage {summary['logp_delta_positive_adv']:+.4f}, "
          f"negative advantage {summary['logp_delta_negative_adv']:+.4f}")  # fmt: skip
    print(f"wrote {summary['out_dir']} in {summary['seconds']:.1f}s")


if __name__ == "__main__":
    main()
