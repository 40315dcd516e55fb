"""What both HTTP servers guard alike (the search API, ``retrieval.api``, and the agent API, ``serving.app``): who may
ask, request bodies and requests in flight, image queries, page ids from URLs, and the shape of every error reply.

- ``Access``: the ``Host`` names a request may carry (loopback names unless more are allowed: a web page that rebinds
  its own name to 127.0.0.1 is refused with 400) and the API key, sent as ``Authorization: Bearer KEY`` (the way the
  ``openai`` client sends it), that every path but the public ones needs (401 without it). ``access_of`` makes one
  from a server's command line (``add_access_args``): the key is read from the environment variable that
  ``--api-key-env`` names, never from a flag or a file, and a server bound off loopback without a key refuses to start.
- ``Guard``: an ASGI wrapper that checks access, answers 503 with ``Retry-After`` beyond ``max_in_flight`` requests at
  once (before the body is read; the exempt paths, ``/health``, are answered outside the limit), and reads the body
  itself before the app sees it: 413 over ``max_body_bytes`` (by its header, or as it streams in), 408 when it has not
  all arrived within ``body_timeout_s`` (a client that trickles its body cannot hold a place longer), and 413 for a
  JSON body that could hold more than ``max_json_values`` values (counted from its commas and brackets before
  anything parses it: a 16 MB body of empty objects would take almost a GB as Python objects).
- ``images.ImageDecoder``: image queries checked from their headers, then decoded on threads of their own.
- ``page_file``: a page id from a URL resolved in the corpus, or the HTTP error (400, 403, 404).
- ``ErrorShape``: how one server's errors read: ``DETAIL`` (``{"detail": message}``, FastAPI's own) or ``OPENAI``
  (``{"error": {"message", "type", "param", "code"}}``, the code being the HTTP status). ``install_errors`` gives
  every error of an app that shape: raised HTTPExceptions (``ParamError`` names the offending field as ``param``),
  unknown routes (404) and methods (405), requests that do not validate (422, ``param`` naming the first offending
  field) and unexpected exceptions (500, without their text, which may hold paths or internals; the server's log has
  it).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)
ROUTER_PHRASES = {404: "Not Found", 405: "Method Not Allowed"}  # what the router says when no route matches
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
ANY_HOST = "*"


@dataclass(frozen=True)
class RequestLimits:
    max_image_bytes: int = 10 << 20  # per decoded image file
    max_image_pixels: int = 40_000_000  # decompression bombs: checked from the header, before decoding
    max_request_pixels: int = 80_000_000  # all image queries of one request, from their headers
    max_body_bytes: int = 64 << 20
    max_in_flight: int = 8  # requests served at once
    max_decodes: int = 2  # requests decoding images at once
    decode_wait_s: float = 30.0
    query_pixels: int = 4_000_000  # decoded image queries are shrunk to this many pixels
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow's plugin names
    body_timeout_s: float = 30.0  # the whole body must arrive within this, from the request's start
    max_json_values: int = 100_000  # values a JSON body may hold (a question, its history and an image need far fewer)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """A ``Host`` header's name, without port or brackets: ``a:8000`` is ``a``, ``[::1]:8000`` is ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rpartition(":")[0] if header.count(":") == 1 else header


@dataclass(frozen=True)
class Access:
    """Who may ask: ``hosts``, the names a ``Host`` header may carry (``ANY_HOST``: any); ``api_key``, the Bearer token
    every path needs except ``public`` ones (exact paths, or prefixes when they end with ``/`` and are not ``/``)."""

    api_key: str | None = None
    hosts: tuple[str, ...] = LOOPBACK_NAMES
    public: tuple[str, ...] = ("/health",)

    def is_public(self, path: str) -> bool:
        return any(path == p or (p != "/" and p.endswith("/") and path.startswith(p)) for p in self.public)

    def refusal(self, scope) -> tuple[int, str, dict[str, str] | None] | None:
        """(status, message, headers) refusing the request, or None."""
        headers = dict(scope["headers"])
        if ANY_HOST not in self.hosts and host_name(headers.get(b"host", b"").decode("latin-1")) not in self.hosts:
            return 400, "this server does not answer to that Host name (see --allow-host)", None
        if self.api_key is None or self.is_public(scope["path"]):
            return None
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return None
        return 401, "a valid API key is required, as 'Authorization: Bearer KEY'", {"WWW-Authenticate": "Bearer"}


def add_access_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name clients may use besides 127.0.0.1, localhost and [::1] (repeatable; '*': any)",
    )
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="environment variable holding the API key clients send as 'Authorization: Bearer KEY' (required when "
        "--host is not loopback)",
    )


def access_of(host: str, allow_hosts: list[str], api_key_env: str | None, public: tuple[str, ...]) -> Access:
    """The access a server bound to ``host`` grants, from its flags; ValueError says what is missing."""
    key = None
    if api_key_env is not None:
        key = os.environ.get(api_key_env)
        if not key:
            raise ValueError(f"--api-key-env names {api_key_env!r}, which is not set in the environment")
    if key is None and not is_loopback(host):
        raise ValueError(
            f"--host {host} is reachable from other machines: set --api-key-env VAR, a variable holding the key "
            "clients must send (or bind 127.0.0.1)"
        )
    named = [] if host in ("0.0.0.0", "::", "") or is_loopback(host) else [host.lower()]  # a specific address
    hosts = LOOPBACK_NAMES + tuple(host_name(h) if h != ANY_HOST else h for h in [*allow_hosts, *named])
    return Access(key, hosts, public)


class ParamError(HTTPException):
    """An HTTP error that names the offending field (OpenAI's ``param``)."""

    def __init__(self, status: int, message: str, param: str):
        super().__init__(status, message)
        self.param = param


class ErrorShape:
    """How one server's error replies read."""

    def body(self, status: int, message: str, param: str | None = None) -> dict:
        raise NotImplementedError

    def response(
        self, status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None
    ) -> JSONResponse:
        return JSONResponse(self.body(status, message, param), status, headers=headers)


class DetailErrors(ErrorShape):
    def body(self, status: int, message: str, param: str | None = None) -> dict:
        return {"detail": message}


class OpenAIErrors(ErrorShape):
    def body(self, status: int, message: str, param: str | None = None) -> dict:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": status}}


DETAIL, OPENAI = DetailErrors(), OpenAIErrors()


def validation_error(err: RequestValidationError) -> tuple[str, str | None]:
    """A request that does not validate: the message (its first problems) and the first offending field."""

    def where(problem: dict) -> str:
        loc = [str(p) for p in problem.get("loc", ())]
        # Locations start with where the value came from (body, query, path); a JSON syntax error has an offset.
        return ".".join(loc[1:]) if len(loc) > 1 and problem.get("type") != "json_invalid" else "".join(loc[:1])

    problems = err.errors()
    said = "; ".join(f"{where(p)}: {p.get('msg', '')}" for p in problems[:3])
    return f"malformed request: {said}", (where(problems[0]) or None) if problems else None


def install_errors(app: FastAPI, shape: ErrorShape) -> None:
    """Every error ``app`` answers takes ``shape``."""

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and the router's 404 and 405
    async def http_error(request, err: StarletteHTTPException):
        message = str(err.detail)
        if message == ROUTER_PHRASES.get(err.status_code):  # say what was not found
            message = f"{message}: {request.method} {request.url.path}"
        return shape.response(err.status_code, message, err.headers, getattr(err, "param", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        message, param = validation_error(err)
        return shape.response(422, message, param=param)

    app.add_middleware(UnexpectedErrors, shape=shape)


class UnexpectedErrors:
    """ASGI middleware answering an exception nobody handled with a 500 in ``shape``, its traceback logged. Starlette's
    own handler re-raises it, so the server closes the connection, and a client's next request on it fails."""

    def __init__(self, app, shape: ErrorShape):
        self.app, self.shape = app, shape

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            if started:  # the reply is half sent: only closing the connection can tell the client (the server logs it)
                raise
            log.exception("%s %s failed", scope["method"], scope["path"])
            reply = self.shape.response(500, "internal server error; the server's log has the details")
            await reply(scope, receive, send)


class Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class Guard:
    """ASGI wrapper: access (``Access``), requests in flight, and the body read here, bounded in bytes, time and JSON
    values, then handed to ``app`` whole (see the module docstring). ``exempt`` paths skip the in-flight limit.
    Its replies take ``errors``. The event loop is one thread: the in-flight count is a plain counter."""

    def __init__(
        self,
        app,
        limits: RequestLimits,
        errors: ErrorShape,
        access: Access = Access(),
        exempt: tuple[str, ...] = ("/health",),
        retry_after_s: int = 1,
    ):
        self.app, self.limits, self.errors, self.access, self.exempt = app, limits, errors, access, exempt
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            if refusal := self.access.refusal(scope):
                raise Refused(*refusal)
            if scope["path"] in self.exempt:
                return await self.app(scope, receive, send)
            if self.in_flight >= self.limits.max_in_flight:
                message = f"busy: {self.limits.max_in_flight} requests in flight; retry shortly"
                raise Refused(503, message, {"Retry-After": str(self.retry_after_s)})
        except Refused as r:
            return await self.errors.response(r.status, r.message, r.headers)(scope, receive, send)
        self.in_flight += 1
        try:
            body = await self._read_body(scope, receive)
        except Refused as r:
            self.in_flight -= 1
            return await self.errors.response(r.status, r.message, r.headers)(scope, receive, send)
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= 1

    async def _read_body(self, scope, receive) -> bytes:
        limits = self.limits
        too_big = Refused(413, f"request body over {limits.max_body_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            raise too_big
        body, deadline = bytearray(), asyncio.get_running_loop().time() + limits.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                raise Refused(408, f"the request body did not arrive within {limits.body_timeout_s:g} s") from None
            if message["type"] == "http.disconnect":
                raise Refused(400, "the client left before its body arrived")  # nobody reads this reply
            body += message.get("body", b"")
            if len(body) > limits.max_body_bytes:
                raise too_big
            if not message.get("more_body", False):
                break
        # Every JSON value but the first follows a comma or opens a container: an upper bound, counted in C.
        if body and body.count(b",") + body.count(b"{") + body.count(b"[") >= limits.max_json_values:
            raise Refused(413, f"the request body holds over {limits.max_json_values} JSON values")
        return bytes(body)


def _replay(body: bytes, receive):
    """``receive`` that gives the body read by the guard first, then the connection's own messages (disconnects)."""
    pending = [body]

    async def replayed():
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replayed


class Pages(Protocol):
    def page_path(self, page_id: str) -> Path: ...


def page_file(pages: Pages, page_id: str) -> Path:
    """The image file of a page id from a URL (``retrieval.base.PageCatalog.page_path`` resolves it inside the
    corpus), or the HTTP error: 400 for an id shaped like a path, 404 for no such page, 403 for one outside."""
    if any(c in page_id for c in "/\\\x00") or page_id.startswith("."):
        raise HTTPException(400, f"malformed page id {page_id!r}: page ids are {{doc}}_{{page}}, not paths")
    try:
        return pages.page_path(page_id)
    except (KeyError, FileNotFoundError):
        raise HTTPException(404, f"no page {page_id!r} in the corpus") from None
    except ValueError:
        raise HTTPException(403, f"page {page_id!r} resolves outside the corpus") from None
