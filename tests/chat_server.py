"""A real OpenAI-compatible chat server on 127.0.0.1 whose behaviour is chosen by the URL path: the judge of
the reward tests, and a faulty policy endpoint of the evaluation tests (fixtures shared through ``conftest.py``).

A client's ``base_url`` is ``{server.url}/{scenario}``, so its requests arrive at
``/{scenario}/chat/completions``. Scenarios:

- ``reply/<url-quoted text>``: 200 with that text as the assistant message.
- ``grade`` / ``slowgrade/<key>[/<seconds>]``: replies "True" when the prediction contains one of the
  reference alternatives (case-insensitive), else "False"; ``slowgrade`` holds each request (default
  0.05 s, at most 1 s) and records the peak number of concurrent requests under ``key``.
- ``auth/<key>``: "True" when the request carries ``Authorization: Bearer <key>``, else HTTP 401.
- ``authsha/<sha256 hex>``: the same for a key whose sha256 is given (the URL never holds the key).
- ``sleep/<seconds>``: waits (at most 60 s), then replies "True".
- ``flaky/<key>/<n>``: the first n requests for ``key`` get HTTP 500, later ones "True".
- ``status/<code>``: always that HTTP status.
- ``body/<url-quoted body>``: 200 with that raw body.
- ``hangup``: announces a 1000-byte body, sends 10 bytes, closes the connection.
- ``drop``: closes the connection without answering.
- ``trickle``: sends a valid header, then one body byte every 0.2 s (the whole body takes over 10 s).

``hits[scenario]`` counts requests per scenario path (so tests can count attempts) and
``last_request[scenario]`` keeps the last JSON payload and Authorization header.
"""

import hashlib
import json
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vrag_rl.reward.judge import JudgeConfig

_REFERENCE = re.compile(r"^Reference answer: (.*)$", re.MULTILINE)
_PREDICTION = re.compile(r"^Predicted answer: (.*)$", re.MULTILINE)


def completion(content: str | None) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that left early (timeout tests) is expected. The default prints a traceback from the handler's
        thread, and Python 3.11 formats tracebacks with ``ast.parse``, which is not thread-safe there: a test
        parsing code at the same moment in the main thread failed with 'AST constructor recursion depth
        mismatch'."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeJudgeServer:
    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.last_request: dict[str, dict] = {}
        self.peak_concurrency: Counter[str] = Counter()
        self._concurrency: Counter[str] = Counter()
        self._flaky_failures: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.httpd = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def flaky_should_fail(self, key: str, failures: int) -> bool:
        with self._lock:
            self._flaky_failures[key] += 1
            return self._flaky_failures[key] <= failures

    def enter(self, key: str) -> None:
        with self._lock:
            self._concurrency[key] += 1
            self.peak_concurrency[key] = max(self.peak_concurrency[key], self._concurrency[key])

    def leave(self, key: str) -> None:
        with self._lock:
            self._concurrency[key] -= 1


def _grade(prompt: str) -> str:
    refs = [r.strip().lower() for r in _REFERENCE.search(prompt).group(1).split(" | ")]
    prediction = _PREDICTION.search(prompt).group(1).lower()
    return "True" if any(ref and ref in prediction for ref in refs) else "False"


def _make_handler(server: FakeJudgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path.endswith("/chat/completions"), self.path
            scenario = self.path[1 : -len("/chat/completions")]
            with server._lock:
                server.hits[scenario] += 1
                server.last_request[scenario] = {"json": request, "authorization": self.headers.get("Authorization")}
            kind, _, arg = scenario.partition("/")
            prompt = request["messages"][0]["content"]
            if kind == "reply":
                self._send(200, completion(urllib.parse.unquote(arg)))
            elif kind in ("auth", "authsha"):
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                if (hashlib.sha256(token.encode()).hexdigest() if kind == "authsha" else token) == arg:
                    self._send(200, completion("True"))
                else:
                    self._send(401, b'{"error": "bad key"}')
            elif kind == "grade":
                self._send(200, completion(_grade(prompt)))
            elif kind == "slowgrade":
                key, _, hold = arg.partition("/")
                server.enter(key)
                try:
                    time.sleep(min(float(hold or 0.05), 1.0))
                    verdict = _grade(prompt)
                finally:
                    server.leave(key)
                self._send(200, completion(verdict))
            elif kind == "sleep":
                time.sleep(min(float(arg), 60.0))
                self._send(200, completion("True"))
            elif kind == "flaky":
                key, _, failures = arg.partition("/")
                if server.flaky_should_fail(key, int(failures)):
                    self._send(500, b'{"error": "overloaded"}')
                else:
                    self._send(200, completion("True"))
            elif kind == "status":
                self._send(int(arg), b'{"error": {"message": "nope"}}')
            elif kind == "body":
                self._send(200, urllib.parse.unquote(arg).encode(), "text/plain")
            elif kind == "hangup":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'{"choices":')
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            elif kind == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            elif kind == "trickle":
                body = completion("True")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    pass  # the client gave up, as it should
                self.close_connection = True
            else:
                self._send(404, b'{"error": "unknown scenario"}')

    return Handler


@pytest.fixture(scope="session")
def judge_server() -> Iterator[FakeJudgeServer]:
    server = FakeJudgeServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fast_config():
    """JudgeConfig factory with test-sized timeouts; keyword arguments override."""

    def make(base_url: str, **overrides) -> JudgeConfig:
        settings = dict(model="judge", timeout_s=0.3, max_retries=2, backoff_s=0.01, backoff_cap_s=0.05)
        settings.update(overrides)
        return JudgeConfig(base_url=base_url, **settings)

    return make


@pytest.fixture
def closed_port_url():
    """URL of a loopback port nobody listens on: bound, never listening, for the whole test, so that no server the
    test starts can be given the same port (connections to it are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
