"""HTTP search API over a retriever (FastAPI + uvicorn, loopback by default).

Endpoints:
- ``GET /search?queries=q1&queries=q2[&top_k=10]`` — the VRAG reference API: per query, a ranked list of
  ``{"idx": rank, "image_file": path}``. As in the reference (Alibaba-NLP/VRAG ``search_engine_api.py``)
  ``idx`` is the 0-based rank within the query's list and ``image_file`` a path the client opens itself
  (here the absolute path of the page image); the reference always returns 10 pages, hence the default.
- ``POST /search`` — JSON ``{"queries": [...], "image_queries": [base64...], "top_k": 5, "mode":
  "visual" | "text" | "hybrid"}``; returns ``{"results": [...], "image_results": [...]}``, one ranked list
  per query of ``{"idx", "page_id", "score", "image_file"}`` (image queries are always visual).
- ``GET /pages/{page_id}`` — the page JPEG, for clients on another machine.
- ``GET /health`` — page count and available modes.

Bad requests get JSON ``{"detail": ...}``: 422 for limits on batch size, query length and top_k; 400 for
undecodable images, malformed page ids and modes the server cannot serve; 413 for oversized bodies or
images; 404 for unknown pages; 403 for a page whose file lies outside the corpus.

CLI: ``python -m vrag_rl.retrieval.api --corpus C --index I --model DIR [--host 127.0.0.1] [--port 8002]``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import sys
import threading
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict

from vrag_rl.retrieval.base import BaseRetriever
from vrag_rl.retrieval.types import Hit, IndexMode, SearchMode


@dataclass(frozen=True)
class Limits:
    max_batch: int = 32  # text + image queries per request
    max_query_chars: int = 1000
    max_top_k: int = 50
    max_image_bytes: int = 10 << 20  # per decoded image file
    max_image_pixels: int = 40_000_000  # decompression bombs: checked from the header, before decoding
    max_body_bytes: int = 64 << 20


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    queries: list[str] = []
    image_queries: list[str] = []  # base64 image files, optionally as "data:image/...;base64,..." URLs
    top_k: int = 5
    mode: SearchMode = SearchMode.VISUAL


class _BodyLimit:
    """ASGI wrapper refusing bodies over ``max_bytes`` with 413, by header or while streaming (chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            body = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
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


def _check_queries(queries: list[str], n_images: int, top_k: int, limits: Limits) -> None:
    if not queries and not n_images:
        raise HTTPException(422, "no queries: give at least one text or image query")
    if len(queries) + n_images > limits.max_batch:
        n = len(queries) + n_images
        raise HTTPException(422, f"{n} queries in one request; the limit is {limits.max_batch}")
    if not 1 <= top_k <= limits.max_top_k:
        raise HTTPException(422, f"top_k must be in [1, {limits.max_top_k}], got {top_k}")
    for i, q in enumerate(queries):
        if not q.strip():
            raise HTTPException(422, f"query {i} is empty")
        if len(q) > limits.max_query_chars:
            raise HTTPException(422, f"query {i} has {len(q)} characters; the limit is {limits.max_query_chars}")


def _decode_image(data: str, i: int, limits: Limits) -> Image.Image:
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > 4 * ((limits.max_image_bytes + 2) // 3):  # longer than any base64 of max_image_bytes
        raise HTTPException(413, f"image query {i} is over {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, f"image query {i} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        w, h = image.size
        if w * h > limits.max_image_pixels:
            raise HTTPException(413, f"image query {i} is {w}x{h} pixels; the limit is {limits.max_image_pixels}")
        return image.convert("RGB")
    except Image.DecompressionBombError:
        raise HTTPException(413, f"image query {i} is a decompression bomb") from None
    except (OSError, SyntaxError, ValueError):
        raise HTTPException(400, f"image query {i} is not a decodable image") from None


def _hit_json(hits: list[Hit]) -> list[dict]:
    return [{"idx": i, "page_id": h.page_id, "score": h.score, "image_file": h.image_path} for i, h in enumerate(hits)]


def create_app(retriever: BaseRetriever, limits: Limits = Limits()):
    """The ASGI app serving ``retriever`` (an in-process ``Retriever`` or a Ray ``DistributedRetriever``)."""
    app = FastAPI(title="vrag-rl page search", version="1")
    # One search at a time: the embedder is a torch model (not re-entrant), and queueing here keeps
    # memory flat under a burst; the handlers are sync, so FastAPI runs them on its thread pool.
    lock = threading.Lock()

    def run(fn, *args):
        with lock:
            return fn(*args)

    @app.get("/health")
    def health():
        modes = list(SearchMode) if retriever.text_index is not None else [SearchMode.VISUAL]
        return {"status": "ok", "pages": len(retriever.page_ids), "modes": modes}

    @app.get("/search")
    def search_get(queries: list[str] = Query(...), top_k: int = 10):
        _check_queries(queries, 0, top_k, limits)
        hits = run(retriever.search, queries, top_k, "visual")
        return [[{"idx": i, "image_file": h.image_path} for i, h in enumerate(q)] for q in hits]

    @app.post("/search")
    def search_post(req: SearchRequest):
        _check_queries(req.queries, len(req.image_queries), req.top_k, limits)
        if req.mode != SearchMode.VISUAL and req.queries and retriever.text_index is None:
            raise HTTPException(400, f"mode {req.mode!r} needs a text index, and this server has none (no OCR)")
        images = [_decode_image(data, i, limits) for i, data in enumerate(req.image_queries)]
        results = run(retriever.search, req.queries, req.top_k, req.mode) if req.queries else []
        image_results = run(retriever.search_by_image, images, req.top_k) if images else []
        return {"results": [_hit_json(h) for h in results], "image_results": [_hit_json(h) for h in image_results]}

    @app.get("/pages/{page_id}")
    def page(page_id: str):
        if any(c in page_id for c in "/\\\x00") or page_id.startswith("."):
            raise HTTPException(400, f"malformed page id {page_id!r}: page ids are {{doc}}_{{page}}, not paths")
        try:
            path = retriever.page_path(page_id)
        except (KeyError, FileNotFoundError):
            raise HTTPException(404, f"no page {page_id!r} in the corpus") from None
        except ValueError:
            raise HTTPException(403, f"page {page_id!r} resolves outside the corpus") from None
        return FileResponse(path, media_type="image/jpeg")

    return _BodyLimit(app, limits.max_body_bytes)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from vrag_rl.retrieval.embed import EmbedderConfig
    from vrag_rl.retrieval.index import StaleIndexError
    from vrag_rl.retrieval.local import LocalRetriever

    p = argparse.ArgumentParser(prog="python -m vrag_rl.retrieval.api", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="corpus directory (pages.parquet + pages/)")
    p.add_argument("--index", required=True, help="visual index directory (vrag_rl.retrieval.index build)")
    p.add_argument("--model", required=True, help="ColQwen2 retriever model directory the index was built with")
    p.add_argument("--text-index", default=None, help="saved BM25 index (default: from CORPUS/ocr.parquet if any)")
    p.add_argument("--index-mode", choices=list(IndexMode), default=IndexMode.EXACT)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--pool-factor", type=int, default=1, help="must match the index's token pooling")
    p.add_argument("--host", default="127.0.0.1", help="bind address; loopback unless you mean to expose it")
    p.add_argument("--port", type=int, default=8002, help="0 picks a free port (logged at start-up)")
    p.add_argument("--max-batch", type=int, default=Limits.max_batch)
    p.add_argument("--max-query-chars", type=int, default=Limits.max_query_chars)
    p.add_argument("--max-top-k", type=int, default=Limits.max_top_k)
    a = p.parse_args(argv)

    try:
        cfg = EmbedderConfig(model_dir=a.model, device=a.device, dtype=a.dtype, pool_factor=a.pool_factor)
        retriever = LocalRetriever(a.corpus, a.index, cfg, text_index=a.text_index, index_mode=a.index_mode)
    except (StaleIndexError, FileNotFoundError, ValueError) as err:  # a wrong path, model or stale index
        print(f"error: {err}", file=sys.stderr)
        return 2
    limits = Limits(max_batch=a.max_batch, max_query_chars=a.max_query_chars, max_top_k=a.max_top_k)
    uvicorn.run(create_app(retriever, limits), host=a.host, port=a.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
