"""Typed configuration of the main job (GRPO training): the schema Hydra checks (``vrag_rl.main`` registers it).

The dataclasses are the schema: YAML in ``conf/`` and ``recipes/`` only sets values, and every key can be
overridden on the command line (``python -m vrag_rl.main +recipe=tiny_cpu algo.group_size=8``). Unknown keys and
values of the wrong type fail in Hydra; values out of range fail in the dataclasses' own checks when the
config is turned into objects at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vrag_rl.algo.config import AlgoConfig
from vrag_rl.data.paths import BUNDLED_CORPUS
from vrag_rl.job.tracking import TrackingConfig
from vrag_rl.learner.config import TrainerConfig
from vrag_rl.retrieval.actor import RetrieverConfig
from vrag_rl.reward.judge import JudgeConfig
from vrag_rl.reward.score import RewardConfig
from vrag_rl.rollout.engine import SamplingConfig
from vrag_rl.rollout.worker import RolloutConfig


@dataclass
class PolicyModels:
    policy: str | None = None  # a Hugging Face checkpoint directory; None: the tiny policy (built in tiny_dir)
    retriever: str | None = None  # a ColQwen2 directory; None: the tiny one
    dense: str | None = None  # a CLIP / SigLIP directory: a single-vector index beside ColQwen2 (search_mode dense)
    tiny_dir: str = ".cache/tiny"
    tiny_seed: int = 0


@dataclass
class DataConfig:
    corpus: str = str(BUNDLED_CORPUS)  # pages/, pages.parquet, qa.parquet
    index: str | None = None  # its page index; None: the corpus's cached one (retrieval.corpus_index), built if needed
    dense_index: str | None = None  # the single-vector index of models.dense; None: cached, built if needed
    holdout_every: int = 10  # every n-th question is held out for validation, never trained on
    max_val_questions: int = 16
    # GRPO draws from the first n training questions only (SFT uses them all): a small set seen again and again
    max_grpo_questions: int | None = None

    def __post_init__(self) -> None:
        if self.holdout_every < 2 or self.max_val_questions < 0:
            raise ValueError("data: holdout_every >= 2 and max_val_questions >= 0")
        if self.max_grpo_questions is not None and self.max_grpo_questions < 1:
            raise ValueError("data: max_grpo_questions >= 1 (or null for all)")


@dataclass
class SFTConfig:
    steps: int = 0  # supervised warm-start steps on expert trajectories before GRPO; 0: none
    batch_size: int = 8  # expert trajectories per step
    crop_batch_size: int = 0  # lone crop turns per step (job/sft.py): teaches small models box coordinates
    lr: float = 1e-5
    warmup_steps: int = 5
    freeze_vision: bool = True  # full fine-tune of the language model; the vision tower stays as it is
    expert: bool = True  # train on the corpus's synthetic expert trajectories (questions with an answer box)
    teacher_data: str | None = None  # teacher trajectories (``python -m vrag_rl.eval sft-data``), beside them

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.crop_batch_size < 0 or self.lr <= 0:
            raise ValueError("sft: steps >= 0, batch_size >= 1, crop_batch_size >= 0, lr > 0")
        if not self.expert and self.teacher_data is None:
            raise ValueError("sft: with expert=false, teacher_data must name the trajectories to train on")


@dataclass
class RunConfig:
    steps: int = 100  # GRPO steps
    val_every: int = 10  # greedy validation every n steps (0: never), and at the end
    save_every: int = 10  # checkpoint every n steps (0: only at the end)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in out_dir when there is one
    out_dir: str | None = None  # None: Hydra's run directory (hydra.run.dir)
    export_dtype: str = "bfloat16"
    max_consecutive_skips: int = 3  # optimizer updates in a row skipped for non-finite values before the run stops

    def __post_init__(self) -> None:
        if self.steps < 1 or self.val_every < 0 or self.save_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("run: steps >= 1, val_every >= 0, save_every >= 0, keep_checkpoints >= 1")
        if self.max_consecutive_skips < 1:
            raise ValueError("run: max_consecutive_skips >= 1")


@dataclass
class TrainConfig:
    """``python -m vrag_rl.main``: SFT warm start (optional), then GRPO on Ray. Recipes set values."""

    seed: int = 0
    models: PolicyModels = field(default_factory=PolicyModels)
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # rollout.model_dir is set at start
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # training rollouts; validation is greedy
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    judge: JudgeConfig | None = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.rollout.partial and not self.algo.max_staleness:
            raise ValueError("rollout.partial needs algo.max_staleness >= 1: otherwise no batch runs during an update")
