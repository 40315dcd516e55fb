"""The served agent (``python -m vrag_rl.serve``) as users start it: a real process on 127.0.0.1 with the warm tiny
policy on a vLLM engine over the bundled corpus, started once for the serving tests."""

import pytest
from serve_process import MAX_LIVE, MAX_WAITING, ServeProcess, serve_args


@pytest.fixture(scope="session")
def agent_server(warm_policy, tiny_dirs, bundled_index, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    limits = ["--max-live", str(MAX_LIVE), "--max-waiting", str(MAX_WAITING), "--time-limit", "120"]
    server = ServeProcess(serve_args(warm_policy, tiny_dirs, bundled_index) + limits, log)
    yield server
    server.stop()
    # uvicorn shuts down gracefully, then re-raises SIGTERM: the exit status is the signal's
    assert server.proc.returncode == -15 and "stopped: sessions ended" in log.read_text(), log.read_text()[-3000:]


# Debian's Chromium, headless, with nothing that reaches outside the machine (as the environment documents).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """A real headless Chromium driven by Playwright, started once per session (nothing is downloaded)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
