"""Session fixtures: the tiny model kit is built once and cached on disk across test sessions.

The retrieval fixtures (tiny ColQwen2 embedder, a visual index of the bundled corpus) live here because the
rollout tests search the same index. The index is built once per session in a temporary directory and must
be treated as read-only: tests that change an index copy it first. It stores float32 vectors so that scores
equal colpali-engine's scorer run on freshly computed embeddings (float16 storage moves scores by ~1e-3,
enough to swap the many near-ties of a random model). Shards of 8 pages: the 24 bundled pages make 3 shards.
"""

import contextlib
import multiprocessing.process
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Tests use local model directories only; no hub look-ups or usage reports leave the machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import vrag_rl  # noqa: F401  (installs the torchvision import hook before anything imports transformers)
from vrag_rl.models.tiny import TinyConfig, build_tiny_models

sys.path.insert(0, str(Path(__file__).parent))  # test helpers import as top-level modules
from chat_server import closed_port_url, fast_config, judge_server  # noqa: E402, F401  (fixtures of every test)

CACHE = Path(os.environ.get("VRAG_RL_CACHE", Path(__file__).resolve().parents[1] / ".cache"))


@pytest.fixture(autouse=True)
def no_wandb_service_left():
    """wandb.init in this process writes its service's address to os.environ (WANDB_SERVICE). Left there, every
    main job a later test starts as a subprocess (or through Slurm) joins this process's service, where a killed
    run's id stays "in use" and its resume fails."""
    yield
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="session")
def tiny_dirs() -> dict[str, Path]:
    return build_tiny_models(CACHE / "tiny", TinyConfig(seed=0))


@pytest.fixture(scope="session")
def tiny_processor(tiny_dirs):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dirs["policy"])


@pytest.fixture(scope="session")
def tiny_policy(tiny_dirs):
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_dirs["policy"], dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def encoder(tiny_processor):
    from vrag_rl.agent.chat import ChatEncoder

    return ChatEncoder(tiny_processor)


@pytest.fixture(scope="session")
def bundled_corpus() -> Path:
    """The synthetic corpus shipped in data/: the demo's default and the tests' documents."""
    return Path(__file__).resolve().parents[1] / "data" / "synthetic-small"


BUNDLED_SHARD_SIZE = 8


@pytest.fixture(scope="session")
def embedder_cfg(tiny_dirs):
    from vrag_rl.retrieval.embed import EmbedderConfig

    return EmbedderConfig(model_dir=str(tiny_dirs["retriever"]), device="cpu", dtype="float32", batch_size=4)


@pytest.fixture(scope="session")
def embedder(embedder_cfg):
    from vrag_rl.retrieval.embed import PageEmbedder

    return PageEmbedder(embedder_cfg)


@pytest.fixture(scope="session")
def bundled_index(bundled_corpus, embedder, tmp_path_factory) -> Path:
    """Index directory of data/synthetic-small (exact + IVF approximate), read-only."""
    from vrag_rl.retrieval.index import MultiVectorIndex
    from vrag_rl.retrieval.types import IndexConfig

    out = tmp_path_factory.mktemp("bundled_index") / "index"
    cfg = IndexConfig(shard_size=BUNDLED_SHARD_SIZE, dtype="float32", approx="ivf")
    MultiVectorIndex.build(out, bundled_corpus, embedder, cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def visual_index(bundled_index) -> Path:
    """Alias of ``bundled_index`` (the name the serving tests use)."""
    return bundled_index


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster shared by every test that needs one."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def warm_policy(tiny_dirs, bundled_corpus) -> Path:
    """The tiny policy after its supervised warm start: it searches, crops and answers (cached on disk)."""
    from vrag_rl.job.warm import build_warm_policy

    return build_warm_policy(tiny_dirs["policy"], bundled_corpus, CACHE / "warm")


@pytest.fixture(scope="session")
def vllm_server(warm_policy, tmp_path_factory):
    """A real vLLM OpenAI-compatible server process serving the warm tiny policy as "tiny" on 127.0.0.1 (base URL
    ``.../v1``), started once per session: the evaluated endpoint and the judge of the tests."""
    from vrag_rl.vllm_server import VLLMServer

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    extra = ["--limit-mm-per-prompt", '{"image": 8}', "--seed", "0"]
    server = VLLMServer(warm_policy, "tiny", log, max_model_len=4096, extra_args=extra)
    try:
        yield server.base_url()
    finally:
        server.stop()


# Test tiers (``make test-fast`` runs ``-m "not slow"``, ``make test`` everything). A test is slow when it uses,
# directly or through other fixtures, one of these fixtures; tests that start such things in their own bodies are
# marked ``slow`` in their modules.
SLOW_FIXTURES = (
    "ray_session",  # a local Ray cluster
    "warm_policy",  # trains the tiny policy's warm start (~2 minutes) when .cache/warm is missing
    "vllm_server",  # a vLLM OpenAI-compatible server process
    "vllm_engine",  # a vLLM engine in a Ray actor (rollout/test_engines.py)
    "pool",  # rollout workers with vLLM engines on Ray (rollout/test_pool.py)
    "agent_server",  # a `python -m vrag_rl.serve` process with its vLLM engine (serving/conftest.py)
    "browser",  # headless Chromium through Playwright (serving/conftest.py)
    "cluster",  # Slurm on two nodes made of network namespaces (launch/test_two_nodes.py)
    "straight",  # the main job in a subprocess (test_main.py)
    "endpoint_run",  # `python -m vrag_rl.eval`, which starts Ray, against the vLLM server (evaluation/test_eval.py)
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in SLOW_FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# The guard of the fast tier: while a test that is not marked slow sets up or runs, starting Ray, vLLM, the main
# job, a server, Slurm or a browser fails it (a session fixture that a slow test set up earlier is not a start).
SLOW_COMMAND = re.compile(
    r"gcs_server|raylet|\bvllm\b|\bvrag_rl\.(main|serve|eval|retrieval\.api)\b|sbatch|slurm|munged|chromium"
)
_fast_test: list[str] = []  # the node id of the fast test being set up or run, if one is


def _refuse(what: str) -> None:
    if _fast_test:
        raise RuntimeError(f"{_fast_test[0]} is marked fast but starts {what}: mark it slow (tests/conftest.py)")


_execute_child = subprocess.Popen._execute_child
_process_start = multiprocessing.process.BaseProcess.start


def _guarded_execute_child(self, args, *a, **kw):  # every subprocess.Popen (run, check_output, ...) comes here
    argv = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
    if found := SLOW_COMMAND.search(argv):
        _refuse(f"a process of {found.group(0)!r} ({argv[:200]})")
    return _execute_child(self, args, *a, **kw)


def _guarded_process_start(self):
    module = getattr(getattr(self, "_target", None), "__module__", None) or ""
    if module.split(".")[0] in ("vllm", "ray"):  # vLLM's engine core process (``LLM``, ``AsyncLLM``)
        _refuse(f"a process running {module}")
    _process_start(self)


subprocess.Popen._execute_child = _guarded_execute_child
multiprocessing.process.BaseProcess.start = _guarded_process_start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _fast_guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _fast_guard(item):
        return (yield)


@contextlib.contextmanager
def _fast_guard(item):
    fast = item.get_closest_marker("slow") is None
    if fast:
        _fast_test.append(item.nodeid)
    try:
        yield
    finally:
        if fast:
            _fast_test.clear()
