"""The HTTP search API (``retrieval.api``) seen as a local retriever: what the agent loop needs of one.

Searches go to ``POST {base_url}/search``; page files are read from the corpus directory, which the client sees as
the server does (one machine, or a shared filesystem), so that crops are cut from the page itself. A server that
has an API key gets it as a Bearer token on every request.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
from PIL import Image

from vrag_rl.retrieval.base import PageCatalog
from vrag_rl.retrieval.types import Hit, SearchMode


class SearchClient:
    def __init__(self, base_url: str, corpus_dir: str | Path, timeout_s: float = 60.0, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.catalog = PageCatalog(corpus_dir)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers)

    def _post(self, body: dict) -> dict:
        try:
            response = self._http.post(f"{self.base_url}/search", json=body)
        except httpx.HTTPError as err:
            raise RuntimeError(f"the search API at {self.base_url} does not answer: {type(err).__name__}") from err
        if response.status_code != 200:
            raise RuntimeError(f"the search API at {self.base_url} answered {response.status_code}: {response.text}")
        return response.json()

    def _hits(self, ranked: list[dict]) -> list[Hit]:
        for h in ranked:
            if h["page_id"] not in self.catalog:
                raise ValueError(f"the search API returned page {h['page_id']!r}, which this corpus does not have")
        return self.catalog.hits([(h["page_id"], float(h["score"])) for h in ranked])

    def search(self, queries: list[str], top_k: int = 5, mode: str = SearchMode.VISUAL) -> list[list[Hit]]:
        if not queries:
            return []
        body = self._post({"queries": queries, "top_k": top_k, "mode": str(mode)})
        return [self._hits(r) for r in body["results"]]

    def search_by_image(
        self, images: list[Image.Image], top_k: int = 5, mode: str = SearchMode.VISUAL
    ) -> list[list[Hit]]:
        if not images:
            return []
        encoded = []
        for im in images:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            encoded.append(base64.b64encode(buf.getvalue()).decode())
        body = self._post({"image_queries": encoded, "top_k": top_k, "image_mode": str(mode)})
        return [self._hits(r) for r in body["image_results"]]

    def page_path(self, page_id: str) -> Path:
        return self.catalog.page_path(page_id)

    def health(self) -> str | None:
        """None when the API answers, else why not."""
        try:
            response = self._http.get(f"{self.base_url}/health", timeout=3)
        except httpx.HTTPError as err:
            return f"the search API at {self.base_url} does not answer: {type(err).__name__}"
        return None if response.status_code == 200 else f"the search API answered {response.status_code}"

    def close(self) -> None:
        self._http.close()
