"""Bounded calls to an OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint (the judge, the policy
endpoint of evaluation).

Faults never raise and never hang: every call comes back as a ``Completion`` whose ``status`` says what
happened, after at most ``1 + max_retries`` attempts with capped, jittered exponential backoff. Connecting,
sending and each socket read time out after ``timeout_s``, and the body is read against a deadline of
``timeout_s`` from the start of the attempt (so a server that trickles bytes is cut off) and at most
``max_response_bytes`` long. A server that trickles the *headers* is limited only by the per-read timeout and
the HTTP parser's header-size limit. No attempt starts and no backoff sleeps past a caller's ``deadline``.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass

import httpx

# Statuses of a Completion. Only "ok" carries content.
OK = "ok"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
HTTP_ERROR = "http_error"
BAD_RESPONSE = "bad_response"  # body is not JSON, too large, or not the chat-completions schema


@dataclass(frozen=True)
class Completion:
    content: str | None  # choices[0].message.content; None unless status == "ok"
    status: str
    detail: str
    attempts: int
    finish_reason: str | None = None  # choices[0].finish_reason as the server gave it


@dataclass(frozen=True)
class Retries:
    max_retries: int = 3  # attempts = 1 + max_retries at most
    backoff_s: float = 0.5  # first wait; doubles per retry, capped, with jitter in [50%, 100%]
    backoff_cap_s: float = 8.0


def api_key_from_env(variable: str | None, setting: str) -> str | None:
    """The key held by the environment variable ``variable`` (None: no key); a named variable that is not set
    is an error naming ``setting``, not an anonymous call."""
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise KeyError(f"{setting} names {variable!r}, which is not set in the environment")
    return key


def snippet(data: bytes | str, limit: int = 200) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text[:limit] + ("..." if len(text) > limit else "")


class ChatAPI:
    """Thread-safe client of one endpoint; one ``httpx.Client`` with a connection pool of ``max_in_flight``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout_s: float,
        max_in_flight: int = 16,
        max_response_bytes: int = 1 << 20,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout_s, self.max_response_bytes = timeout_s, max_response_bytes
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s), limits=limits)
        # Callers queue here rather than in httpx's pool, whose wait counts against timeout_s and would
        # fail healthy requests with PoolTimeout when many callers share the client.
        self._in_flight = threading.BoundedSemaphore(max_in_flight)

    def close(self) -> None:
        self._http.close()

    def complete(self, payload: dict, retries: Retries, deadline: float | None = None) -> Completion:
        """One completion; a status other than "ok" after the last attempt, or when ``deadline``
        (``time.monotonic()``) has passed before an attempt, is returned as it is."""
        attempts = 0
        while True:
            with self._in_flight:
                if deadline is not None and time.monotonic() > deadline:
                    return Completion(None, TIMEOUT, f"deadline passed after {attempts} attempts", attempts)
                attempts += 1
                outcome, retryable = self._attempt(payload)
            if not retryable or attempts > retries.max_retries:
                return Completion(outcome.content, outcome.status, outcome.detail, attempts, outcome.finish_reason)
            delay = min(retries.backoff_s * 2 ** (attempts - 1), retries.backoff_cap_s)
            delay *= random.uniform(0.5, 1.0)  # jitter: a batch hitting a 429 must not retry in lockstep
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(delay)

    def _attempt(self, payload: dict) -> tuple[Completion, bool]:
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._http.stream("POST", self.url, json=payload, headers=self._headers) as response:
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > self.max_response_bytes:
                        return _failed(BAD_RESPONSE, f"body over {self.max_response_bytes} bytes"), False
                    if time.monotonic() > deadline:
                        return _failed(TIMEOUT, f"body not complete within {self.timeout_s}s"), True
                status_code = response.status_code
        except httpx.TimeoutException as err:
            return _failed(TIMEOUT, f"{type(err).__name__}: {err}"), True
        except httpx.TransportError as err:  # refused, reset, closed mid-response, protocol violation
            return _failed(CONNECTION_ERROR, f"{type(err).__name__}: {err}"), True
        except httpx.HTTPError as err:  # e.g. a body that fails content-encoding decoding
            return _failed(BAD_RESPONSE, f"{type(err).__name__}: {err}"), True
        if status_code != 200:
            # 429 and 5xx are the server asking to come back later; other codes will not change.
            retryable = status_code == 429 or status_code >= 500
            return _failed(HTTP_ERROR, f"HTTP {status_code}: {snippet(bytes(body))}"), retryable
        return _read(bytes(body))


def _failed(status: str, detail: str) -> Completion:
    return Completion(None, status, detail, 0)


def _read(body: bytes) -> tuple[Completion, bool]:
    try:
        data = json.loads(body)
    except ValueError:
        # Usually a body cut short by an overloaded server or proxy: worth another attempt.
        return _failed(BAD_RESPONSE, f"not JSON: {snippet(body)}"), True
    try:
        choice = data["choices"][0]
        content, finish = choice["message"]["content"], choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        content, finish = None, None
    if not isinstance(content, str):
        # Valid JSON in the wrong shape is a server contract mismatch; repeating will not fix it.
        return _failed(BAD_RESPONSE, f"no choices[0].message.content string: {snippet(body)}"), False
    return Completion(content, OK, snippet(content), 0, finish if isinstance(finish, str) else None), False
