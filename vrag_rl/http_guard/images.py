"""Image queries of both HTTP servers: read from their headers against the bounds of ``RequestLimits`` (formats,
bytes, pixels per image and per request) before anything is decoded, then decoded on threads of their own.

``ImageDecoder`` decodes on ``max_decodes`` threads (a request waits ``decode_wait_s`` for them, then gets 503), so
only those threads ever hold a full-size raster; each image is shrunk to ``query_pixels`` at once (one-band images
before they become RGB).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout

from fastapi import HTTPException
from PIL import Image

from vrag_rl.http_guard import RequestLimits


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
    """The opened image decoded, as RGB shrunk to ``query_pixels``. One-band images (bilevel, grey) are shrunk before
    they become RGB: a 1-bit 40-megapixel PNG of a few KB would otherwise take 160 MB more as RGB."""
    try:
        image.load()
        if image.mode in ("1", "L") and image.width * image.height > limits.query_pixels:
            image = _shrunk(image.convert("L") if image.mode == "1" else image, limits.query_pixels)
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # no second full-size copy when RGB
    except Image.DecompressionBombError:
        raise HTTPException(413, f"image query {i} is a decompression bomb") from None
    except (OSError, SyntaxError, ValueError):
        raise HTTPException(400, f"image query {i} is not a decodable image") from None
    return _shrunk(rgb, limits.query_pixels)


def _shrunk(image: Image.Image, pixels: int) -> Image.Image:
    if image.width * image.height <= pixels:
        return image
    scale = (pixels / (image.width * image.height)) ** 0.5
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


class ImageDecoder:
    """A request's image queries, checked from their headers, then decoded on ``max_decodes`` threads of its own."""

    def __init__(self, limits: RequestLimits):
        self.limits = limits
        self.pool = ThreadPoolExecutor(max_workers=limits.max_decodes, thread_name_prefix="decode")

    def check(self, data: list[str]) -> list[Image.Image]:
        """The images of ``data`` (base64 image files or ``data:`` URLs) opened, nothing decoded, or the HTTP error
        (400, 413) of a bad format or of too many pixels, read from their headers."""
        limits = self.limits
        opened = [open_image(d, i, limits) for i, d in enumerate(data)]
        pixels = sum(im.width * im.height for im in opened)
        if pixels > limits.max_request_pixels:
            raise HTTPException(
                413, f"the image queries hold {pixels} pixels; the limit is {limits.max_request_pixels}"
            )
        return opened

    def _decode_all(self, opened: list[Image.Image]) -> list[Image.Image]:
        return [decode_image(im, i, self.limits) for i, im in enumerate(opened)]

    def _busy(self) -> HTTPException:
        return HTTPException(503, f"busy decoding images on {self.limits.max_decodes} threads; retry shortly")

    def decode(self, data: list[str]) -> list[Image.Image]:
        """RGB images of ``data``, or the HTTP error (400, 413, 503). Blocks its thread."""
        job = self.pool.submit(self._decode_all, self.check(data))
        try:
            return job.result(timeout=self.limits.decode_wait_s)
        except FuturesTimeout:
            job.cancel()
            raise self._busy() from None

    async def decode_async(self, data: list[str]) -> list[Image.Image]:
        """``decode`` for the event loop: headers read on a worker thread, images on the decoder's own."""
        opened = await asyncio.to_thread(self.check, data)
        return await self.run(self._decode_all, opened)

    async def run(self, fn, *args):
        """``fn(*args)`` on the decoder's threads, waited for up to ``decode_wait_s`` (then 503)."""
        job = self.pool.submit(fn, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job), self.limits.decode_wait_s)
        except TimeoutError:
            job.cancel()
            raise self._busy() from None
