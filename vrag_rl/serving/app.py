"""The agent behind an OpenAI-compatible API, and the web page, as one ASGI app (FastAPI).

- ``POST /v1/chat/completions``: the model is the agent. The last user message is the question (text, and
  optionally one image as a ``data:`` URL: search by image). The answer is the message content; the extension
  field ``vrag`` carries the result (``serving.events``: citations, turns with searches, page ids and crop boxes).
  ``stream: true`` sends server-sent events in the OpenAI chunk shape, one chunk per agent event (the event in
  ``vrag``), the answer as the content delta, then ``data: [DONE]``; a session that fails mid-way sends an
  ``error`` object, as OpenAI's API does.
- ``GET /v1/models``; ``GET /health`` (the process is up); ``GET /ready`` (503 with the reason while the corpus
  is empty, the policy endpoint does not answer or the engine has failed).
- ``GET /pages/{id}[?box=x1,y1,x2,y2][&side=N]``: a page image, a crop of it, at most ``side`` pixels a side.
- ``GET /v1/corpus?offset=&limit=``: the corpus's pages, for the page that browses them.
- ``GET /``: the web page (``serving/web``; no script, style or font from elsewhere).

Every error, whatever refuses it, is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (``type``
``invalid_request_error`` below 500, ``server_error`` from 500; ``code`` the HTTP status; ``param`` the first
offending field of a request that does not validate), so OpenAI's clients raise their exception of the status with
our message: 400 for a malformed question or image, 404 for unknown pages and routes, 405 for unknown methods, 413
for a body or image over the limits, 422 for a request that does not validate, 503 with ``Retry-After`` when every
place is taken (``max_in_flight`` requests open: refused before their bodies are read; or every session place), 503
while not ready, 504 past the time limit, 502 when the policy endpoint fails, 500 for a failure nobody planned for
(without its text). The body limit, the image bounds and the error replies are the search API's too
(``vrag_rl.http_guard``).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import lru_cache
from importlib.resources import files

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict

from vrag_rl.http_guard import OPENAI, BodyLimit, ImageDecoder, RequestLimits, install_errors, page_file
from vrag_rl.retrieval.base import PageCatalog
from vrag_rl.serving.events import ErrorEvent, Event, PageSizes, ResultEvent, View
from vrag_rl.serving.sessions import Busy, Question, SessionScheduler

WEB = files("vrag_rl.serving") / "web"
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_SIDE = 2048
MAX_QUESTION_CHARS = 4000


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields (temperature, ...) the agent fixes itself

    model: str | None = None
    messages: list[dict]
    stream: bool = False


def question_of(messages: list[dict], decoder: ImageDecoder) -> Question:
    """The last user message as a question: its text parts joined, and at most one inline image."""
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise HTTPException(400, "no user message: the last user message is the question")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise HTTPException(400, "the user message's content must be a string or a list of parts")
    text = " ".join(p.get("text", "") for p in parts if p.get("type") == "text").strip()
    urls = [(p.get("image_url") or {}).get("url", "") for p in parts if p.get("type") == "image_url"]
    if not text:
        raise HTTPException(400, "the question has no text")
    if len(text) > MAX_QUESTION_CHARS:
        raise HTTPException(400, f"the question has {len(text)} characters; the limit is {MAX_QUESTION_CHARS}")
    if len(urls) > 1:
        raise HTTPException(400, f"{len(urls)} images in the question; at most one (searched by image)")
    if urls and not urls[0].startswith("data:"):
        raise HTTPException(400, "images must be inline data: URLs (this server fetches nothing)")
    image = decoder.decode(urls)[0] if urls else None
    return Question(text, image)


def page_image(catalog: PageCatalog, page_id: str, box: str | None, side: int) -> bytes:
    path = page_file(catalog, page_id)
    region = None
    if box is not None:
        try:
            region = tuple(int(float(v)) for v in box.split(","))
        except ValueError:
            region = ()
        if len(region) != 4 or region[2] <= region[0] or region[3] <= region[1]:
            raise HTTPException(400, f"box must be x1,y1,x2,y2 with x2 > x1 and y2 > y1, got {box!r}")
    return _render(path, region, max(16, min(side, MAX_SIDE)))


@lru_cache(maxsize=512)
def _render(path, region: tuple[int, int, int, int] | None, side: int) -> bytes:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if region is not None:  # a crop is shown enlarged, as the agent saw it
            im = im.crop(region)
            scale = side / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            im = im.resize(size, Image.Resampling.BICUBIC)
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


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
    limits: RequestLimits = RequestLimits(max_body_bytes=16 << 20, max_in_flight=128),
):
    """``scheduler`` None: nothing can be answered (``not_ready`` says why, e.g. an empty corpus). ``close`` runs at
    shutdown, after the last response (uvicorn then re-raises the signal that stopped it)."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(close)

    app = FastAPI(title="vrag-rl agent", version="1", lifespan=lifespan)
    install_errors(app, OPENAI)
    decoder = ImageDecoder(limits)

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
            "steps": scheduler.steps,  # batched engine turns taken, and the session turns in them
            "session_turns": scheduler.stepped,
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
        data = await asyncio.to_thread(page_image, catalog, page_id, box, side)
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
        reason = not_ready()
        if reason is not None or scheduler is None:
            raise HTTPException(503, reason or "not ready")
        question = await asyncio.to_thread(question_of, req.messages, decoder)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            session = scheduler.submit(question, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except Busy as busy:
            raise HTTPException(503, str(busy), {"Retry-After": str(busy.retry_after_s)}) from None
        cid = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        if req.stream:
            return StreamingResponse(_stream(cid, model_name, session, events), media_type="text/event-stream")
        return await _answer(cid, model_name, session, events, request)

    return BodyLimit(app, limits.max_body_bytes, limits.max_in_flight, OPENAI)


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
                return OPENAI.response(event.status, event.message)
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
                yield f"data: {json.dumps(OPENAI.body(event.status, event.message))}\n\n"
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
