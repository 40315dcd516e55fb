"""A judge the job serves itself: a local checkpoint behind vLLM's OpenAI-compatible server, in a Ray actor.

With ``judge.model_dir`` set, the main job starts ``JudgeServer`` as a Ray actor (``serve_num_gpus`` GPUs on
clusters; Ray gives the server process those devices), waits until the server answers ``/health``, points the
reward actor's judge client at it (``constrain_verdict`` makes a small judge's replies parseable) and stops it
at the end. The server process dies with its actor (``vrag_rl.vllm_server``), so a killed job leaves no server
behind. The judge code is the same as for any endpoint: only where the endpoint comes from differs.

The server needs an API key that the job makes at start (``secrets.token_urlsafe``) and keeps in memory: it goes
to the server actor and the reward actor as constructor arguments (Ray keeps those in memory; a ``runtime_env``'s
variables would be written to Ray's logs) and to the server process through its environment. No file, command
line or saved config holds it, and the server is checked to refuse a request without it.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from vrag_rl.reward.judge import JudgeConfig
from vrag_rl.vllm_server import VLLMServer

SERVED_NAME = "judge"
NODE_ADDRESS = "node"  # host: the address of the node the server runs on


class JudgeServer(VLLMServer):
    """The judge's checkpoint served as ``SERVED_NAME`` under its ``serve_*`` settings."""

    def __init__(self, cfg: JudgeConfig, log_file: str, host: str = "127.0.0.1", api_key: str | None = None) -> None:
        if host == NODE_ADDRESS:
            import ray

            host = ray.util.get_node_ip_address()
        super().__init__(
            cfg.model_dir,
            SERVED_NAME,
            log_file,
            host=host,
            max_model_len=cfg.serve_max_model_len,
            dtype=cfg.serve_dtype,
            on_cpu=cfg.serve_num_gpus == 0,
            start_timeout_s=cfg.serve_start_timeout_s,
            api_key=api_key,
        )


def start_judge_server(cfg: JudgeConfig, log_file: Path):
    """The server as a Ray actor on a node with ``serve_num_gpus`` GPUs, the judge config that uses it, and its API
    key (for the judge client: ``reward.actor.start_reward_actor``'s ``judge_key``)."""
    import ray

    # The server process is not Ray's to count: the actor only holds its GPUs.
    remote = ray.remote(JudgeServer).options(num_cpus=0.1, num_gpus=cfg.serve_num_gpus)
    # On one machine the server listens on loopback only; across nodes, on its node's address.
    host = "127.0.0.1" if len([n for n in ray.nodes() if n["Alive"]]) == 1 else NODE_ADDRESS
    key = secrets.token_urlsafe(32)
    actor = remote.remote(cfg, str(log_file), host, key)
    url = ray.get(actor.base_url.remote(), timeout=cfg.serve_start_timeout_s + 60)
    return actor, JudgeConfig(**{**cfg.__dict__, "base_url": url, "model": SERVED_NAME, "api_key_env": None}), key
