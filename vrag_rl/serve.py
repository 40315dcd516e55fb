"""Serve the agent: ``python -m vrag_rl.serve``, an OpenAI-compatible agent API and its web page on one port.

    python -m vrag_rl.serve                                  # the tiny defaults, on http://127.0.0.1:8000
    python -m vrag_rl.serve --policy runs/DATE/TIME/export --corpus POOL --index INDEX --retriever-model COLQWEN2
    python -m vrag_rl.serve --endpoint http://127.0.0.1:8001/v1 --endpoint-model NAME --processor EXPORT ...
    python -m vrag_rl.serve --search-url http://127.0.0.1:8002 ...   # searches through the page search API
    AGENT_KEY=... python -m vrag_rl.serve --host 0.0.0.0 --api-key-env AGENT_KEY --allow-host agent.example ...

The agent is the loop of training and evaluation (``rollout.agent_loop``), unchanged; concurrent users' sessions
are batched into the same engine calls (``serving.sessions``); the API and the page are ``serving.app``. Defaults
need nothing but this repository: the bundled corpus, the tiny ColQwen2 and the warm tiny policy on a local vLLM
engine (float32, as on CPU); on GPUs, serve the checkpoint with ``vllm serve`` and pass ``--endpoint``.

Off loopback the server needs an API key (``--api-key-env``: the variable that holds it) and answers only to the
``Host`` names it is given (``--allow-host``); readiness reasons name no address (the log has them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import httpx

from vrag_rl.chat_api import api_key_from_env
from vrag_rl.cli import (
    add_agent_args,
    add_corpus_args,
    add_policy_args,
    dense_config,
    fill_defaults,
    rollout_config,
)
from vrag_rl.data.records import load_pages
from vrag_rl.http_guard import access_of, add_access_args
from vrag_rl.retrieval.base import PageCatalog
from vrag_rl.retrieval.corpus_index import open_retriever
from vrag_rl.rollout.engine import SamplingConfig
from vrag_rl.rollout.worker import RolloutWorker
from vrag_rl.serving.app import PUBLIC, create_app
from vrag_rl.serving.sessions import SchedulerConfig, SessionScheduler

log = logging.getLogger("vrag_rl.serve")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vrag_rl.serve", description=__doc__.split("\n\n")[0])
    add_corpus_args(p)
    add_policy_args(p)
    add_agent_args(p)
    p.add_argument("--search-url", default=None, help="the page search API (retrieval.api) instead of in-process")
    p.add_argument("--search-key-env", default=None, metavar="VAR", help="environment variable with its API key")
    p.add_argument("--host", default="127.0.0.1", help="bind address; loopback unless you mean to expose it")
    p.add_argument("--port", type=int, default=8000)
    add_access_args(p)
    p.add_argument("--served-name", default="vrag-agent", help="the model name the API answers to")
    p.add_argument("--max-live", type=int, default=SchedulerConfig.max_live, help="sessions batched together")
    p.add_argument("--max-waiting", type=int, default=SchedulerConfig.max_waiting, help="queued beyond those")
    p.add_argument("--time-limit", type=float, default=SchedulerConfig.time_limit_s, help="seconds per request")
    p.add_argument("--image-top-k", type=int, default=SchedulerConfig.image_top_k, help="search by image: pages")
    return p


class Probe:
    """Whether a dependency answers, asked at most every ``every_s`` seconds. ``check`` returns None or why not, in
    words that may name addresses: those go to the log (once per change), and clients are told ``says``."""

    def __init__(self, check, says: str, every_s: float = 5.0):
        self.check, self.says, self.every_s = check, says, every_s
        self._at, self._answer, self._why = -every_s, None, None

    def __call__(self) -> str | None:
        if time.monotonic() - self._at >= self.every_s:
            why, self._at = self.check(), time.monotonic()
            if why is not None and why != self._why:
                log.warning("not ready: %s", why)
            self._why, self._answer = why, None if why is None else self.says
        return self._answer


def endpoint_check(base_url: str, api_key: str | None = None):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def check() -> str | None:
        try:
            status = httpx.get(f"{base_url.rstrip('/')}/models", headers=headers, timeout=3).status_code
        except httpx.HTTPError as err:
            return f"the policy endpoint {base_url} does not answer ({type(err).__name__})"
        return None if status == 200 else f"the policy endpoint {base_url} answered {status}"

    return check


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import uvicorn

    try:  # before anything loads: a server that would be open to other machines does not start
        access = access_of(a.host, a.allow_host, a.api_key_env, PUBLIC)
        search_key = api_key_from_env(a.search_key_env, "--search-key-env")
    except (ValueError, KeyError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2

    try:
        catalog = PageCatalog(a.corpus)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = {p.page_id: (p.width, p.height, p.timestamp) for p in load_pages(a.corpus)}
    scheduler, worker, checks = None, None, []
    if not catalog.page_ids:
        log.warning("the corpus %s has no pages", catalog.root)
        checks.append(lambda: "the corpus has no pages: ingest documents first (python -m vrag_rl.retrieval.ingest)")
    else:
        fill_defaults(a)
        if a.search_url:
            from vrag_rl.retrieval.client import SearchClient

            retriever = SearchClient(a.search_url, a.corpus, api_key=search_key)
            checks.append(Probe(retriever.health, "the search API does not answer"))
        else:
            retriever = open_retriever(a.corpus, a.index, a.retriever_model, dense_config(a))
        if a.endpoint:
            key = api_key_from_env(a.endpoint_key_env, "--endpoint-key-env")
            checks.append(Probe(endpoint_check(a.endpoint, key), "the policy endpoint does not answer"))
        worker = RolloutWorker(rollout_config(a, max_images=max(a.max_turns, a.image_top_k)), retriever=retriever)
        sampling = SamplingConfig(temperature=a.temperature, max_tokens=a.max_turn_tokens)
        cfg = SchedulerConfig(a.max_live, a.max_waiting, a.time_limit, a.image_top_k)
        scheduler = SessionScheduler(worker.loop, sampling, cfg, sizes)
        stopped = "the session scheduler stopped; the server's log has the details"  # it logged the failure
        checks.append(lambda: None if scheduler.alive else stopped)

    def not_ready() -> str | None:
        return "; ".join(why for check in checks if (why := check()) is not None) or None

    def close() -> None:
        if scheduler is not None:
            scheduler.close()
        if worker is not None:
            worker.close()
        print("stopped: sessions ended, engine closed", flush=True)

    app = create_app(scheduler, catalog, sizes, a.served_name, not_ready, close, access=access)
    print(f"serving {a.served_name} on http://{a.host}:{a.port} (the web page is at /)", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
