"""The main job: ``python -m vrag_rl.main +recipe=NAME`` (Hydra; any key can be overridden on the command line).

Recipes live in ``recipes/NAME.yaml`` and only set values; the schema (keys, types, defaults, checks) is
``vrag_rl.job.config.TrainConfig``, registered here as ``train_schema``. ``+recipe=tiny_cpu`` is the built-in
default ``make demo`` runs: tiny models, the bundled corpus, 2 CPU cores. What a run does, step by step:
``vrag_rl/job/grpo.py``.
A bad key or value stops the job at start, with the key named.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vrag_rl.job.config import TrainConfig
from vrag_rl.reward.judge import JudgeConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ConfigStore.instance().store(name="train_schema", node=TrainConfig)
# ``+judge=endpoint judge.base_url=URL judge.model=NAME``: the judge section is empty (None) unless chosen.
ConfigStore.instance().store(group="judge", name="endpoint", node=JudgeConfig)
# ``+judge=local judge.model_dir=CHECKPOINT``: a judge the job serves itself (``reward.judge_server``).
ConfigStore.instance().store(
    group="judge", name="local", node={"base_url": "", "model": "judge", "model_dir": "???", "constrain_verdict": True}
)


def register_recipes(directory: Path = RECIPES) -> list[str]:
    """Every ``recipes/*.yaml`` as option NAME of the ``recipe`` group, merged at the top level."""
    store = ConfigStore.instance()
    names = []
    for path in sorted(directory.glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


register_recipes()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> None:
    import ray

    from vrag_rl.job.cluster import NodeWatch
    from vrag_rl.job.grpo import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg: TrainConfig = OmegaConf.to_object(raw)  # runs the dataclasses' value checks
    out = Path(cfg.run.out_dir or HydraConfig.get().runtime.output_dir)
    ray.init(include_dashboard=False, log_to_driver=False)  # a local cluster, or RAY_ADDRESS's (launch/slurm.sbatch)
    with NodeWatch():  # a node lost mid-run ends the job naming it, instead of a wait on its actors
        summary = run(cfg, out)
    final = summary["final"]
    print(
        f"\n{summary['steps']} GRPO steps in {summary['seconds']:.0f}s: train reward {final['train/reward']:.3f}, "
        f"ndcg {final['train/ndcg']:.3f}; checkpoint for transformers / vLLM: {summary['export']}; "
        f"metrics: {out / 'metrics.jsonl'} (plot: {out / 'metrics.png'})"
    )


if __name__ == "__main__":
    main()
