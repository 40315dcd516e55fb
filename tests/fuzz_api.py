"""Schema-driven fuzzing of our HTTP APIs (schemathesis, from the app's own OpenAPI document) against a server on
127.0.0.1: valid and invalid requests to every operation, bounded in count and time.

Each reply must come within ``timeout_s`` (no hang), be no server error but 503 (busy or not ready, which a server
may say), and, when it is an error, have the API's own shape. The server process's memory is sampled throughout.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode


@dataclass
class Fuzzed:
    tried: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    peak_growth: int = 0  # bytes of the server's resident memory over its level before the first request
    seconds: float = 0.0


def openai_shape(status: int, body) -> bool:
    error = body.get("error") if isinstance(body, dict) and len(body) == 1 else None
    keys = {"message", "type", "param", "code"}
    return (
        isinstance(error, dict) and set(error) == keys and error["code"] == status and isinstance(error["message"], str)
    )


def detail_shape(status: int, body) -> bool:
    return isinstance(body, dict) and set(body) == {"detail"} and isinstance(body["detail"], str)


def fuzz(
    base_url: str,
    pid: int,
    shape: Callable[[int, object], bool],
    per_operation: int,
    timeout_s: float = 30.0,
    limit_s: float = 60.0,
) -> Fuzzed:
    """``per_operation`` valid and as many invalid requests to each operation of ``base_url``'s OpenAPI document
    (fewer when ``limit_s`` runs out), the server being process ``pid``."""
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    server, out, done = psutil.Process(pid), Fuzzed(), threading.Event()
    base = server.memory_info().rss

    def watch() -> None:
        while not done.is_set():
            out.peak_growth = max(out.peak_growth, server.memory_info().rss - base)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        for operation in schema.get_all_operations():
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _run(operation.ok(), mode, base_url, shape, per_operation, timeout_s, started + limit_s, out)
    finally:
        done.set()
        watcher.join()
        out.seconds = time.monotonic() - started
    return out


def _run(operation, mode, base_url, shape, examples, timeout_s, deadline, out: Fuzzed) -> None:
    quick = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found, within the time
        suppress_health_check=list(HealthCheck),
    )

    @quick
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case) -> None:
        if time.monotonic() > deadline:
            return
        label = f"{case.method} {case.formatted_path} ({mode.value})"
        try:
            response = case.call(base_url=base_url, timeout=timeout_s)
        except Exception as err:  # noqa: BLE001 (a timeout or a dropped connection is the finding)
            out.failures.append(f"{label}: no reply within {timeout_s} s: {type(err).__name__}")
            return
        out.tried += 1
        status = response.status_code
        out.statuses[status] += 1
        if status >= 500 and status != 503:
            out.failures.append(f"{label}: {status} {response.text[:300]}")
        elif status >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            if not shape(status, body):
                out.failures.append(f"{label}: {status} not in the API's error shape: {response.text[:300]}")

    try:
        one()
    except Unsatisfiable:  # no invalid request exists for an operation without parameters (GET /health)
        pass
