"""HTTP search API over a retriever (FastAPI + uvicorn, loopback by default).

Endpoints:
- ``GET /search?queries=q1&queries=q2[&top_k=10]`` — the VRAG reference API: per query, a ranked list of
  ``{"idx": rank, "image_file": path}``. As in the reference (Alibaba-NLP/VRAG ``search_engine_api.py``)
  ``idx`` is the 0-based rank within the query's list and ``image_file`` a path the client opens itself: the
  absolute path of the page image from a server bound to loopback (its clients share its filesystem), else the
  path relative to the corpus (no server path leaves the machine; remote clients fetch ``/pages/{page_id}`` or join
  it to their own copy of the corpus). The reference always returns 10 pages, hence the default.
- ``POST /search`` — JSON ``{"queries": [...], "image_queries": [base64...], "top_k": 5, "mode":
  "visual" | "text" | "dense" | "hybrid", "image_mode": "visual" | "dense" | "hybrid"}``; returns
  ``{"results": [...], "image_results": [...]}``, one ranked list per query of ``{"idx", "page_id", "score",
  "image_file"}``; ``mode`` ranks the text queries, ``image_mode`` the image queries.
- ``GET /pages/{page_id}`` — the page JPEG, for clients on another machine.
- ``GET /health`` — page count and available modes.

Who may ask (``http_guard.Access``): requests whose ``Host`` is not an allowed name (loopback names, and
``--allow-host``) get 400; with an API key (``--api-key-env VAR``, required when ``--host`` is not loopback) every
path but ``/health`` needs ``Authorization: Bearer KEY`` (401). The reference client sends no key: it works against
a server on loopback without one.

Every error is JSON ``{"detail": message}`` (FastAPI's shape, kept for the reference API's clients; the message
is a string, and names no server path): 422 for requests that do not validate and for limits on batch size, query
length and top_k; 400 for undecodable images, image formats outside ``Limits.image_formats``, malformed page ids,
modes the server cannot serve and a foreign ``Host``; 401 without the API key; 408 for a body that has not arrived
within ``body_timeout_s``; 413 for oversized bodies, bodies of too many JSON values, or images; 404 for unknown
pages and routes, 405 for unknown methods; 403 for a page whose file lies outside the corpus; 503 with
``Retry-After`` when the server is at capacity; 500 for a failure nobody planned for, without its text. The access
rules, the body limits, the image bounds and the error replies are the agent API's too (``vrag_rl.http_guard``;
it answers in OpenAI's shape).

Memory stays bounded under a burst: at most ``max_in_flight`` requests are served at once (more get 503 at
once, before their bodies are read; ``/health`` is answered outside the limit); image sizes are read from the
headers and a request's images together may hold ``max_request_pixels`` before anything is decoded; images are
decoded on ``max_decodes`` threads of their own (a request waits up to ``decode_wait_s`` for them, then gets 503),
so only those threads ever hold a full-size raster (and keep the allocator's cache of one), and each decoded image
is shrunk to ``query_pixels`` at once, the size the retriever embeds anyway.

CLI: ``python -m vrag_rl.retrieval.api --corpus C --index I --model DIR [--host 127.0.0.1] [--port 8002]
[--api-key-env VAR] [--allow-host NAME]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict

from vrag_rl.http_guard import (
    DETAIL,
    Access,
    Guard,
    RequestLimits,
    access_of,
    add_access_args,
    install_errors,
    is_loopback,
    page_file,
)
from vrag_rl.http_guard.images import ImageDecoder
from vrag_rl.retrieval.base import BaseRetriever
from vrag_rl.retrieval.types import Hit, IndexMode, SearchMode, SearchSettings


@dataclass(frozen=True)
class Limits(RequestLimits):
    """The bounds of every HTTP server (bodies, requests in flight, images: ``http_guard.RequestLimits``) and the
    search API's own."""

    max_batch: int = 32  # text + image queries per request
    max_query_chars: int = 1000
    max_top_k: int = 50


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    queries: list[str] = []
    image_queries: list[str] = []  # base64 image files, optionally as "data:image/...;base64,..." URLs
    top_k: int = 5
    mode: SearchMode = SearchMode.VISUAL
    image_mode: SearchMode = SearchMode.VISUAL


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


def create_app(
    retriever: BaseRetriever, limits: Limits = Limits(), access: Access = Access(), local_paths: bool = True
):
    """The ASGI app serving ``retriever`` (an in-process ``Retriever`` or a Ray ``DistributedRetriever``).
    ``local_paths``: ``image_file`` is the page's absolute path, else its path relative to the corpus."""
    app = FastAPI(title="vrag-rl page search", version="1")
    root = retriever.catalog.root

    def image_file(h: Hit) -> str:
        return h.image_path if local_paths else os.path.relpath(h.image_path, root)

    def hit_json(hits: list[Hit]) -> list[dict]:
        return [
            {"idx": i, "page_id": h.page_id, "score": h.score, "image_file": image_file(h)} for i, h in enumerate(hits)
        ]

    install_errors(app, DETAIL)
    # One search at a time: the embedder is a torch model (not re-entrant), and queueing here keeps
    # memory flat under a burst; the handlers are sync, so FastAPI runs them on its thread pool.
    lock = threading.Lock()
    decoder = ImageDecoder(limits)

    def run(fn, *args):
        with lock:
            return fn(*args)

    @app.get("/health")
    def health():
        return {"status": "ok", "pages": len(retriever.page_ids), "modes": retriever.modes()}

    @app.get("/search")
    def search_get(queries: list[str] = Query(...), top_k: int = 10):
        _check_queries(queries, 0, top_k, limits)
        hits = run(retriever.search, queries, top_k, "visual")
        return [[{"idx": i, "image_file": image_file(h)} for i, h in enumerate(q)] for q in hits]

    @app.post("/search")
    def search_post(req: SearchRequest):
        _check_queries(req.queries, len(req.image_queries), req.top_k, limits)
        try:  # before any image is decoded
            if req.queries:
                retriever.check_mode(req.mode)
            if req.image_queries:
                retriever.check_mode(req.image_mode, images=True)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        images = decoder.decode(req.image_queries) if req.image_queries else []
        results = run(retriever.search, req.queries, req.top_k, req.mode) if req.queries else []
        image_results = run(retriever.search_by_image, images, req.top_k, req.image_mode) if images else []
        return {"results": [hit_json(h) for h in results], "image_results": [hit_json(h) for h in image_results]}

    @app.get("/pages/{page_id}")
    def page(page_id: str):
        return FileResponse(page_file(retriever, page_id), media_type="image/jpeg")

    return Guard(app, limits, DETAIL, access)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from vrag_rl.retrieval.dense import DenseConfig
    from vrag_rl.retrieval.embed import EmbedderConfig
    from vrag_rl.retrieval.index import StaleIndexError
    from vrag_rl.retrieval.local import LocalRetriever

    p = argparse.ArgumentParser(prog="python -m vrag_rl.retrieval.api", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="corpus directory (pages.parquet + pages/)")
    p.add_argument("--index", required=True, help="visual index directory (vrag_rl.retrieval.index build)")
    p.add_argument("--model", required=True, help="ColQwen2 retriever model directory the index was built with")
    p.add_argument("--text-index", default=None, help="saved BM25 index (default: from CORPUS/ocr.parquet if any)")
    p.add_argument("--index-mode", choices=list(IndexMode), default=IndexMode.EXACT)
    p.add_argument("--dense-model", default=None, help="CLIP / SigLIP model of a single-vector index (mode dense)")
    p.add_argument("--dense-index", default=None, help="its index directory (vrag_rl.retrieval.dense_index build)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--pool-factor", type=int, default=1, help="must match the index's token pooling")
    p.add_argument("--host", default="127.0.0.1", help="bind address; loopback unless you mean to expose it")
    p.add_argument("--port", type=int, default=8002, help="0 picks a free port (logged at start-up)")
    add_access_args(p)
    p.add_argument("--max-batch", type=int, default=Limits.max_batch)
    p.add_argument("--max-query-chars", type=int, default=Limits.max_query_chars)
    p.add_argument("--max-top-k", type=int, default=Limits.max_top_k)
    a = p.parse_args(argv)
    if (a.dense_model is None) != (a.dense_index is None):
        p.error("--dense-model and --dense-index go together")
    try:  # before the model loads: a server that would be open to other machines does not start
        access = access_of(a.host, a.allow_host, a.api_key_env, public=("/health",))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    try:
        cfg = EmbedderConfig(model_dir=a.model, device=a.device, dtype=a.dtype, pool_factor=a.pool_factor)
        dense = DenseConfig(a.dense_model, a.dense_index, a.device, a.dtype) if a.dense_model else None
        settings = SearchSettings(index_mode=a.index_mode)
        retriever = LocalRetriever(a.corpus, a.index, cfg, text_index=a.text_index, dense=dense, settings=settings)
    except (StaleIndexError, FileNotFoundError, ValueError) as err:  # a wrong path, model or stale index
        print(f"error: {err}", file=sys.stderr)
        return 2
    limits = Limits(max_batch=a.max_batch, max_query_chars=a.max_query_chars, max_top_k=a.max_top_k)
    app = create_app(retriever, limits, access, local_paths=is_loopback(a.host))
    uvicorn.run(app, host=a.host, port=a.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
