"""The agent behind an OpenAI-compatible API, and the web page, as one ASGI app (FastAPI).

- ``POST /v1/chat/completions``: the model is the agent. The last user message is the question (text, and
  optionally one image as a ``data:`` URL: search by image). The answer is the message content; the extension
  field ``vrag`` carries the result (``serving.events``: citations, turns with searches, page ids and crop boxes).
  ``stream: true`` sends server-sent events in the OpenAI chunk shape, one chunk per agent event (the event in
  ``vrag``), the answer as the content delta, then ``data: [DONE]``; a session that fails mid-way sends an
  ``error`` object, as OpenAI's API does.
- ``GET /v1/models``; ``GET /health`` (the process is up); ``GET /ready`` (503 with the reason while the corpus
  is empty, the policy endpoint does not answer or the engine has failed; reasons name no address, path or
  exception, which the server's log has).
- ``GET /pages/{id}[?box=x1,y1,x2,y2][&side=N]``: a page image, a crop of it, at most ``side`` pixels a side
  (``serving.pages``: the box is cut to its page first; pages and crops are drawn on two threads of their own).
- ``GET /v1/corpus?offset=&limit=``: the corpus's pages, for the page that browses them.
- ``GET /``: the web page (``serving/web``; no script, style or font from elsewhere).

Who may ask (``http_guard.Access``): requests whose ``Host`` is not an allowed name get 400; with an API key set,
every path but ``/health``, ``/`` and ``/static/`` needs it as ``Authorization: Bearer KEY`` (401), and the web page
asks for it once. A question is checked before anything else (at most ``MAX_MESSAGES`` messages and ``MAX_PARTS``
parts, each part named in a 400), then readiness, then whether a session place is free (503, before its image is
decoded), and only then is its image decoded.

Every error, whatever refuses it, is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (``type``
``invalid_request_error`` below 500, ``server_error`` from 500; ``code`` the HTTP status; ``param`` the first
offending field), so OpenAI's clients raise their exception of the status with our message: 400 for a malformed
question or image or a foreign ``Host``, 401 without the API key, 404 for unknown pages and routes, 405 for unknown
methods, 408 for a body that trickles in, 413 for a body or image over the limits, 422 for a request that does not
validate, 503 with ``Retry-After`` when every place is taken (``max_in_flight`` requests open: refused before their
bodies are read; or every session place), 503 while not ready, 504 past the time limit, 502 when the policy
endpoint fails, 500 for a failure nobody planned for (a 500 or 502 names no exception: the server's log has it).
The access rules, the body limits, the image bounds and the error replies are the search API's too
(``vrag_rl.http_guard``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib.resources import files

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from vrag_rl.http_guard import OPENAI, Access, Guard, ParamError, RequestLimits, install_errors, page_file
from vrag_rl.http_guard.images import ImageDecoder
from vrag_rl.retrieval.base import PageCatalog
from vrag_rl.serving.events import ErrorEvent, Event, PageSizes, ResultEvent, View
from vrag_rl.serving.pages import MAX_SIDE, parse_box, render
from vrag_rl.serving.sessions import Busy, Question, Session, SessionScheduler

log = logging.getLogger(__name__)
WEB = files("vrag_rl.serving") / "web"
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
PUBLIC = ("/health", "/", "/static/")  # answered without the API key: the page asks for it itself
MAX_QUESTION_CHARS = 4000
MAX_MESSAGES = 256
MAX_PARTS = 64


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields (temperature, ...) the agent fixes itself

    model: str | None = None
    messages: list[dict] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False


def question_parts(messages: list[dict]) -> tuple[str, str | None]:
    """The last user message as a question: its text parts joined, and the URL of at most one image. A part that is
    not what OpenAI's API allows is a 400 naming it (``param``); an image may be the older form, its URL a string."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise HTTPException(400, "no user message: the last user message is the question")
    where = f"messages[{users[-1]}].content"
    content = messages[users[-1]].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ParamError(400, f"{where} must be a string or a list of parts", where)
    if len(parts) > MAX_PARTS:
        raise ParamError(400, f"{where} has {len(parts)} parts; the limit is {MAX_PARTS}", where)
    texts, urls = [], []
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ParamError(400, f"{at}.text must be a string", f"{at}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise ParamError(400, f"{at}.image_url must be {{'url': a data: URL}} or the URL", f"{at}.image_url")
            urls.append(url)
        else:
            raise ParamError(400, f"{at} must be an object of type 'text' or 'image_url'", at)
    text = " ".join(texts).strip()
    if not text:
        raise HTTPException(400, "the question has no text")
    if len(text) > MAX_QUESTION_CHARS:
        raise HTTPException(400, f"the question has {len(text)} characters; the limit is {MAX_QUESTION_CHARS}")
    if len(urls) > 1:
        raise HTTPException(400, f"{len(urls)} images in the question; at most one (searched by image)")
    if urls and not urls[0].startswith("data:"):
        raise HTTPException(400, "images must be inline data: URLs (this server fetches nothing)")
    return text, urls[0] if urls else None


class Admission:
    """Session places taken before a session exists: a question is admitted (503 with ``Retry-After`` when every
    place is taken, counting those admitted and not yet submitted) before its image is decoded, so a burst of image
    questions beyond the places costs no decode. Used on the event loop only: a plain counter."""

    def __init__(self, scheduler: SessionScheduler):
        self.scheduler, self.pending = scheduler, 0

    def __enter__(self) -> Admission:
        live, waiting = self.scheduler.load
        cfg = self.scheduler.cfg
        if live + waiting + self.pending >= cfg.max_live + cfg.max_waiting:
            busy = Busy(self.scheduler.retry_after_s())
            raise HTTPException(503, str(busy), {"Retry-After": str(busy.retry_after_s)})
        self.pending += 1
        return self

    def __exit__(self, *exc) -> None:
        self.pending -= 1

    async def session(self, text: str, url: str | None, decoder: ImageDecoder, emit) -> Session:
        """The question admitted (a place held from here until the session is submitted or refused), its image
        decoded, its session submitted."""
        with self:
            image = (await decoder.decode_async([url]))[0] if url else None
            try:
                return self.scheduler.submit(Question(text, image), emit)
            except Busy as busy:
                raise HTTPException(503, str(busy), {"Retry-After": str(busy.retry_after_s)}) from None


def public_message(event: ErrorEvent) -> str:
    """What a client is told of a session's error: failures (500, 502) by their kind only; the log has the rest."""
    if event.status not in (500, 502):
        return event.message
    log.warning("a session ended with %d: %s", event.status, event.message)
    if event.status == 502:
        return "the policy endpoint failed; the server's log has the details"
    return "the agent's session failed; the server's log has the details"


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, vrag: dict | None = None) -> str:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if vrag is not None:
        body["vrag"] = vrag
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def completion(cid: str, model: str, result: ResultEvent) -> dict:
    prompt, generated = result.prompt_tokens, result.completion_tokens
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.answer or ""},
                "finish_reason": "stop" if result.answer is not None else "length",
            }
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated},
        "vrag": result.to_json(),
    }


def create_app(
    scheduler: SessionScheduler | None,
    catalog: PageCatalog,
    sizes: PageSizes,
    model_name: str,
    not_ready: Callable[[], str | None],
    close: Callable[[], None] = lambda: None,
    limits: RequestLimits = RequestLimits(max_body_bytes=16 << 20, max_in_flight=128, max_decodes=1),
    access: Access = Access(public=PUBLIC),
):
    """``scheduler`` None: nothing can be answered (``not_ready`` says why, e.g. an empty corpus, in words fit for
    any client). ``close`` runs at shutdown, after the last response (uvicorn then re-raises the signal that stopped
    it)."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(close)

    app = FastAPI(title="vrag-rl agent", version="1", lifespan=lifespan)
    install_errors(app, OPENAI)
    decoder = ImageDecoder(limits)  # one question image at a time: it may be 40 megapixels
    renders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="render")  # pages: bounded at ingest
    admission = Admission(scheduler) if scheduler is not None else None

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        reason = not_ready()
        if reason is not None or scheduler is None:
            return OPENAI.response(503, reason or "nothing to answer with")
        live, waiting = scheduler.load
        return {
            "status": "ready",
            "model": model_name,
            "pages": len(catalog.page_ids),
            "live": live,
            "waiting": waiting,
            # engine steps, the session turns under way in them (summed: over steps, the mean batch) and turns taken
            "engine_steps": scheduler.timings.steps,
            "engine_batched": scheduler.timings.batched,
            "session_turns": scheduler.timings.turns,
            "max_image_bytes": limits.max_image_bytes,
            "max_body_bytes": limits.max_body_bytes,
        }

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "vrag-rl"}]}

    @app.get("/v1/corpus")
    def corpus(offset: int = 0, limit: int = 60):
        ids = catalog.page_ids[max(0, offset) : max(0, offset) + max(1, min(limit, 500))]
        pages = [View.of(p, None, sizes).to_json() for p in ids]
        return {"total": len(catalog.page_ids), "offset": offset, "pages": pages}

    @app.get("/pages/{page_id}")
    async def page(page_id: str, box: str | None = None, side: int = MAX_SIDE):
        path = page_file(catalog, page_id)
        data = await asyncio.wrap_future(renders.submit(render, path, None if box is None else parse_box(box), side))
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse)
    def index():
        return (WEB / "index.html").read_text()

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC:
            raise HTTPException(404, f"no file {name!r}")
        return Response((WEB / name).read_text(), media_type=STATIC[name])

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        text, url = question_parts(req.messages)
        reason = await asyncio.to_thread(not_ready)  # a probe may ask a dependency over the network
        if reason is not None or scheduler is None:
            raise HTTPException(503, reason or "not ready")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        session = await admission.session(text, url, decoder, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        cid = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        if req.stream:
            return StreamingResponse(_stream(cid, model_name, session, events), media_type="text/event-stream")
        return await _answer(cid, model_name, session, events, request)

    return Guard(app, limits, OPENAI, access)


async def _answer(cid: str, model: str, session, events: asyncio.Queue[Event], request: Request) -> Response | dict:
    """The whole answer in one reply; a client that leaves cancels its session."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)
                continue
            if isinstance(event, ErrorEvent):
                return OPENAI.response(event.status, public_message(event))
            if isinstance(event, ResultEvent):
                return completion(cid, model, event)
    finally:
        session.cancel()


async def _stream(cid: str, model: str, session, events: asyncio.Queue[Event]):
    try:
        yield chunk(cid, model, {"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if isinstance(event, ErrorEvent):
                yield f"data: {json.dumps(OPENAI.body(event.status, public_message(event)))}\n\n"
                break
            if isinstance(event, ResultEvent):
                if event.answer:
                    yield chunk(cid, model, {"content": event.answer})
                finish = "stop" if event.answer is not None else "length"
                yield chunk(cid, model, {}, finish, event.to_json())
                break
            yield chunk(cid, model, {}, None, event.to_json())
        yield "data: [DONE]\n\n"
    finally:  # also when the client closes the stream early
        session.cancel()
