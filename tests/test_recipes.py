"""Every recipe composes with the base config and passes the schema's checks (GPU recipes included)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vrag_rl.job.config import TrainConfig
from vrag_rl.main import RECIPES, register_recipes

CONF = Path(__file__).resolve().parents[1] / "conf"
NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))


def test_the_three_recipes_are_registered():
    assert {"tiny_cpu", "qwen3b_grpo", "qwen7b_grpo"} <= set(register_recipes())


@pytest.mark.parametrize("name", NAMES)
def test_recipe_composes_and_validates(name, monkeypatch):
    monkeypatch.setenv("VRAG_RL_MODELS", "/models")
    monkeypatch.setenv("VRAG_RL_JUDGE_URL", "http://judge:8000/v1")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[f"+recipe={name}"]))
    assert isinstance(cfg, TrainConfig)
    if name.startswith("qwen"):
        assert cfg.models.policy.startswith("/models/Qwen2.5-VL-") and cfg.trainer.param_dtype == "bfloat16"
        assert (cfg.algo.group_size, cfg.algo.prompts_per_step, cfg.trainer.optim.lr) == (5, 32, 1e-6)
        assert cfg.rollout.num_gpus == 1 and cfg.trainer.num_gpus == 1 and cfg.sft.freeze_vision
        weights = (cfg.reward.ndcg_weight, cfg.reward.answer_weight, cfg.reward.format_weight)
        assert cfg.reward.answer_metric == "judge" and weights == (0.2, 0.7, 0.1)
        assert cfg.judge.base_url == "http://judge:8000/v1" and cfg.judge.model_dir is None
    else:
        assert cfg.rollout.vllm.dtype == "float32" and cfg.trainer.num_gpus == 0


@pytest.mark.parametrize("name", ["qwen3b_grpo", "qwen7b_grpo"])
def test_gpu_recipes_take_a_judge_checkpoint_or_stop_without_a_judge(name, monkeypatch):
    monkeypatch.delenv("VRAG_RL_JUDGE_URL", raising=False)
    monkeypatch.setenv("VRAG_RL_JUDGE_DIR", "/models/Qwen2.5-7B-Instruct")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[f"+recipe={name}"]))
        assert cfg.judge.model_dir == "/models/Qwen2.5-7B-Instruct" and cfg.judge.serve_num_gpus == 1
        monkeypatch.delenv("VRAG_RL_JUDGE_DIR")
        with pytest.raises(Exception, match="VRAG_RL_JUDGE_URL or VRAG_RL_JUDGE_DIR"):
            OmegaConf.to_object(compose("config", overrides=[f"+recipe={name}"]))
