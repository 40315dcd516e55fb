"""Typed configuration of the main job, registered with Hydra.

The dataclasses are the schema: YAML in ``conf/`` only sets values, and every key can be overridden on the
command line (``python -m vrag_rl.main demo.num_questions=4 reward.answer_weight=0.5``). Unknown keys and
values of the wrong type fail in Hydra; values out of range fail in the dataclasses' own checks when the
config is turned into objects at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore

from vrag_rl.agent.images import ImageBudget
from vrag_rl.agent.prompt import PromptConfig
from vrag_rl.data.expert import VARIANTS
from vrag_rl.reward.score import RewardConfig

BUNDLED_CORPUS = str(Path(__file__).resolve().parents[1] / "data" / "synthetic-small")


@dataclass
class ModelsConfig:
    tiny_dir: str = ".cache/tiny"  # where the tiny model kit is built (reused when complete)
    tiny_seed: int = 0


@dataclass
class DemoConfig:
    corpus: str = BUNDLED_CORPUS  # a corpus directory (pages/, qa.parquet); default: the bundled one
    num_questions: int = 8
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    max_length: int = 4096  # tokens per trajectory
    lr: float = 1e-4
    steps: int = 2  # GRPO updates on the same batch (PPO epochs)
    kl_coef: float = 0.01
    kl_kind: str = "low_var_kl"
    clip_low: float = 0.2
    clip_high: float = 0.2
    loss_agg: str = "token-mean"

    def __post_init__(self) -> None:
        unknown = set(self.variants) - set(VARIANTS)
        if unknown or len(self.variants) < 2:
            raise ValueError(f"demo.variants needs at least two of {VARIANTS}, got {self.variants}")
        if self.num_questions < 1 or self.steps < 1 or self.lr <= 0 or self.max_length < 64:
            raise ValueError("demo: num_questions, steps >= 1, lr > 0, max_length >= 64")


@dataclass
class MainConfig:
    seed: int = 0
    models: ModelsConfig = field(default_factory=ModelsConfig)
    # The tiny policy's processor accepts images of 4..512 merged patches; the demo shows pages small.
    budget: ImageBudget = field(default_factory=lambda: ImageBudget(min_pixels=64 * 28 * 28, max_pixels=256 * 28 * 28))
    prompt: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


ConfigStore.instance().store(name="main_schema", node=MainConfig)
