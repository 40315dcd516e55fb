"""What both HTTP servers guard alike (the search API, ``retrieval.api``, and the agent API, ``serving.app``): request
bodies and requests in flight, image queries, page ids from URLs, and the shape of every error reply.

- ``BodyLimit``: an ASGI wrapper answering 413 for a body over ``max_body_bytes`` (by its header, or while a chunked
  body streams in) and 503 with ``Retry-After`` beyond ``max_in_flight`` requests at once, before the body is read.
- ``ImageDecoder``: base64 image files checked from their headers (formats, pixels per image and per request) before
  anything is decoded, then decoded on ``max_decodes`` threads of its own (a request waits ``decode_wait_s`` for
  them, then gets 503), so only those threads ever hold a full-size raster; each image is shrunk to
  ``query_pixels`` at once.
- ``page_file``: a page id from a URL resolved in the corpus, or the HTTP error (400, 403, 404).
- ``ErrorShape``: how one server's errors read: ``DETAIL`` (``{"detail": message}``, FastAPI's own) or ``OPENAI``
  (``{"error": {"message", "type", "param", "code"}}``, the code being the HTTP status). ``install_errors`` gives
  every error of an app that shape: raised HTTPExceptions, unknown routes (404) and methods (405), requests that do
  not validate (422, ``param`` naming the first offending field) and unexpected exceptions (500, without their
  text, which may hold paths or internals; the server's log has it).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)
ROUTER_PHRASES = {404: "Not Found", 405: "Method Not Allowed"}  # what the router says when no route matches


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
        return shape.response(err.status_code, message, err.headers)

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


class BodyLimit:
    """ASGI wrapper refusing bodies over ``max_bytes`` with 413, by header or while streaming (chunked), and
    requests beyond ``max_in_flight`` at once with 503 and ``Retry-After`` (the event loop is one thread: a plain
    counter). Its replies take ``errors``; the wrapped app must install the same shape (``install_errors``) for
    the 413 met while streaming, which it raises as an HTTPException."""

    def __init__(self, app, max_bytes: int, max_in_flight: int, errors: ErrorShape, retry_after_s: int = 1):
        self.app, self.max_bytes, self.max_in_flight = app, max_bytes, max_in_flight
        self.errors, self.retry_after_s = errors, retry_after_s
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            message = f"busy: {self.max_in_flight} requests in flight; retry shortly"
            refusal = self.errors.response(503, message, {"Retry-After": str(self.retry_after_s)})
            return await refusal(scope, receive, send)
        self.in_flight += 1
        try:
            await self._limited(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _limited(self, scope, receive, send):
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            refusal = self.errors.response(413, f"request body over {self.max_bytes} bytes")
            return await refusal(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # FastAPI re-raises HTTPExceptions met while reading the body, so this becomes a 413 reply.
                raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


def open_image(data: str, i: int, limits: RequestLimits) -> Image.Image:
    """Image query ``i``'s header, read (allowed formats only) and checked for size; nothing decoded yet. ``data``
    is a base64 image file, optionally as a ``data:`` URL."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > 4 * ((limits.max_image_bytes + 2) // 3):  # longer than any base64 of max_image_bytes
        raise HTTPException(413, f"image query {i} is over {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, f"image query {i} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=limits.image_formats)
    except Image.DecompressionBombError:
        raise HTTPException(413, f"image query {i} is a decompression bomb") from None
    except (OSError, SyntaxError, ValueError):
        raise HTTPException(400, f"image query {i} is not a decodable image of {limits.image_formats}") from None
    w, h = image.size
    if w * h > limits.max_image_pixels:
        raise HTTPException(413, f"image query {i} is {w}x{h} pixels; the limit is {limits.max_image_pixels}")
    return image


def decode_image(image: Image.Image, i: int, limits: RequestLimits) -> Image.Image:
    """The opened image decoded, as RGB shrunk to ``query_pixels``."""
    try:
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # no second full-size copy when RGB
    except Image.DecompressionBombError:
        raise HTTPException(413, f"image query {i} is a decompression bomb") from None
    except (OSError, SyntaxError, ValueError):
        raise HTTPException(400, f"image query {i} is not a decodable image") from None
    if rgb.width * rgb.height > limits.query_pixels:
        scale = (limits.query_pixels / (rgb.width * rgb.height)) ** 0.5
        rgb = rgb.resize((max(1, int(rgb.width * scale)), max(1, int(rgb.height * scale))), Image.Resampling.BILINEAR)
    return rgb


class ImageDecoder:
    """A request's image queries, checked from their headers, then decoded on ``max_decodes`` threads of its own."""

    def __init__(self, limits: RequestLimits):
        self.limits = limits
        self.pool = ThreadPoolExecutor(max_workers=limits.max_decodes, thread_name_prefix="decode")

    def decode(self, data: list[str]) -> list[Image.Image]:
        """RGB images of ``data`` (base64 image files or ``data:`` URLs), or the HTTP error (400, 413, 503)."""
        limits = self.limits
        opened = [open_image(d, i, limits) for i, d in enumerate(data)]
        pixels = sum(im.width * im.height for im in opened)
        if pixels > limits.max_request_pixels:
            raise HTTPException(
                413, f"the image queries hold {pixels} pixels; the limit is {limits.max_request_pixels}"
            )
        job = self.pool.submit(lambda: [decode_image(im, i, limits) for i, im in enumerate(opened)])
        try:
            return job.result(timeout=limits.decode_wait_s)
        except FuturesTimeout:
            job.cancel()
            raise HTTPException(503, f"busy decoding images on {limits.max_decodes} threads; retry shortly") from None


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
