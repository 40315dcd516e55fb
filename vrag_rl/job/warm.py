"""Supervised warm start: the tiny random policy fine-tuned on expert trajectories until it follows the protocol.

The supervised warm start of the training recipe (``trainer.sft``: expert trajectories plus lone crop turns,
``PolicyTrainer`` steps), run in one process and cached, so tests, the watch command and benchmarks get a
policy that visibly searches, crops a box of the page it was shown and answers, without a training run.

    python -m vrag_rl.job.warm --out .cache/warm

The result is a policy directory like the tiny one (same processor files, chat template and config) that
transformers and vLLM load alike; it is rebuilt only when the config or its inputs change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from vrag_rl.agent.chat import ChatEncoder
from vrag_rl.agent.images import ImageBudget
from vrag_rl.data.paths import BUNDLED_CORPUS, cache_dir
from vrag_rl.data.records import holdout_split, load_qa
from vrag_rl.job.sft import ExpertData, run_sft
from vrag_rl.learner.config import OptimConfig, TrainerConfig
from vrag_rl.learner.payloads import Objective
from vrag_rl.learner.trainer import LocalTrainer
from vrag_rl.models.tiny import TINY_BUDGET, TinyConfig, build_tiny_models
from vrag_rl.rollout.agent_loop import AgentConfig

STAMP = "warm_config.json"
PROCEDURE = 4  # part of the stamp: bump when the training procedure changes, so old caches are rebuilt


@dataclass(frozen=True)
class WarmConfig:
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 10  # then cosine decay to 0: greedy decoding wants the late, small steps
    batch_size: int = 4  # expert trajectories per step
    crop_batch_size: int = 16  # lone crop turns per step (see job/sft.py)
    seed: int = 0
    max_length: int = 4096  # tokens per trajectory
    min_pixels: int = TINY_BUDGET.min_pixels  # the image budget pages are shown in (recipes/tiny_cpu.yaml too)
    max_pixels: int = TINY_BUDGET.max_pixels
    holdout_every: int = 10  # every n-th question is held out (as by the main job's data.holdout_every)

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.crop_batch_size) < 1 or self.lr <= 0 or self.holdout_every < 2:
            raise ValueError("need steps, batch_size, crop_batch_size >= 1, lr > 0 and holdout_every >= 2")

    @property
    def budget(self) -> ImageBudget:
        return ImageBudget(min_pixels=self.min_pixels, max_pixels=self.max_pixels)


def _stamp(tiny_policy_dir: Path, corpus_dir: Path, cfg: WarmConfig) -> str:
    # Digests of the inputs, so a rebuilt tiny kit or an edited corpus is not served a stale warm policy.
    digest = hashlib.sha256()
    inputs = ("model.safetensors", "tokenizer.json")
    for path in [tiny_policy_dir / name for name in inputs] + [corpus_dir / "qa.parquet", corpus_dir / "pages.parquet"]:
        digest.update(path.read_bytes())
    return json.dumps({"config": asdict(cfg), "inputs": digest.hexdigest(), "procedure": PROCEDURE}, sort_keys=True)


def build_warm_policy(
    tiny_policy_dir: str | Path, corpus_dir: str | Path, out_dir: str | Path, cfg: WarmConfig = WarmConfig()
) -> Path:
    """Fine-tune the tiny policy on expert trajectories into ``out_dir``; reuse it when its stamp matches."""
    tiny_policy_dir, corpus_dir, out_dir = Path(tiny_policy_dir), Path(corpus_dir), Path(out_dir)
    wanted = _stamp(tiny_policy_dir, corpus_dir, cfg)
    stamp = out_dir / STAMP
    if stamp.exists() and stamp.read_text() == wanted and (out_dir / "model.safetensors").exists():
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not stamp.exists():
        raise FileExistsError(f"{out_dir} exists and is not a warm policy directory; not replacing it")

    from transformers import AutoProcessor

    encoder = ChatEncoder(AutoProcessor.from_pretrained(tiny_policy_dir))
    encoder.check_budget(cfg.min_pixels, cfg.max_pixels)
    train, _ = holdout_split(load_qa(corpus_dir), cfg.holdout_every)
    data = ExpertData(train, corpus_dir, encoder, AgentConfig(budget=cfg.budget, max_length=cfg.max_length))
    optim = OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, schedule="cosine", grad_clip=1.0)
    trainer = LocalTrainer(TrainerConfig(optim=optim), str(tiny_policy_dir), Objective(), cfg.steps)
    run_sft(trainer, data.batches(cfg.batch_size, cfg.crop_batch_size, cfg.seed), cfg.steps)
    # The stamp goes in with the weights, so a directory with a stamp always holds the weights it describes.
    trainer.export(out_dir, "float32", extra_files={STAMP: wanted})
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(cache_dir() / "warm"), help="output policy directory")
    parser.add_argument("--tiny", default=str(cache_dir() / "tiny"), help="tiny kit directory (built if missing)")
    parser.add_argument("--corpus", default=BUNDLED_CORPUS, help="corpus whose questions have answer boxes")
    parser.add_argument("--seed", type=int, default=0, help="seed of both the tiny kit and the warm start")
    args = parser.parse_args()
    tiny = build_tiny_models(args.tiny, TinyConfig(seed=args.seed))
    print(f"policy: {build_warm_policy(tiny['policy'], args.corpus, args.out, WarmConfig(seed=args.seed))}")


if __name__ == "__main__":
    main()
