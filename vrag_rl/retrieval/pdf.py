"""PDF pages rendered by PDFium in a child process, each within a time limit.

PDFium renders in the calling thread and cannot be interrupted, and a page of a few KB can take minutes (a form
drawn by a form drawn by a form...). So ``PdfRenderer`` keeps PDFium in a child process (a fresh interpreter,
started on first use): a page not rendered within ``timeout_s`` costs that page only: the child is killed, and the
next page is rendered by a fresh one, which opens the document again. A crash of PDFium (the child dies) costs the
page alike. Replies come back as a JSON header and raw RGB bytes, never pickles, so that a child subverted by a
hostile file cannot reach the caller through them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from PIL import Image

STARTUP_S = 120.0  # the child's imports on a busy machine: not a page's time
TIMEOUTS_PER_DOCUMENT = 3  # after this many pages past the limit, the rest of a document is not tried


class PdfError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _load(path: str):
    import pypdfium2 as pdfium

    errors = {
        pdfium.raw.FPDF_ERR_FILE: "file not found or could not be opened",
        pdfium.raw.FPDF_ERR_FORMAT: "not in PDF format or corrupted",
        pdfium.raw.FPDF_ERR_PASSWORD: "password required or incorrect password",
        pdfium.raw.FPDF_ERR_SECURITY: "unsupported security scheme",
    }
    # PDFium's own loader, not PdfDocument(path): that one reports a 0-page PDF as a load failure with a stale
    # error code (whatever failed before, e.g. "incorrect password") and leaks the handle.
    raw = pdfium.raw.FPDF_LoadDocument(os.fsencode(path) + b"\0", None)
    if not raw:
        code = pdfium.raw.FPDF_GetLastError()
        locked = code in (pdfium.raw.FPDF_ERR_PASSWORD, pdfium.raw.FPDF_ERR_SECURITY)
        detail = f"PDFium: {errors.get(code, 'unknown error')} (code {code})"
        raise PdfError("encrypted PDF" if locked else "corrupt PDF", detail)
    pdf = pdfium.PdfDocument(raw)
    pdf.init_forms()  # so filled-in form fields are drawn; must precede any page access
    return pdf


def _render(pdf, i: int, dpi: float, max_side: int) -> Image.Image:
    import pypdfium2 as pdfium

    try:
        page = pdf[i]
        try:
            w, h = page.get_size()
            # ceil(side * scale) is the bitmap side; the 0.5 keeps a capped side at max_side, not one above
            scale = min(dpi / 72, (max_side - 0.5) / max(w, h))
            image = page.render(scale=scale, fill_color=(255, 255, 255, 255), draw_annots=True).to_pil()
        finally:
            page.close()
    except (pdfium.PdfiumError, ValueError, ZeroDivisionError) as err:
        raise PdfError("corrupt PDF", str(err)) from err
    return image.convert("RGB")


def _serve(conn) -> None:
    """The child: answers ``open`` and ``render`` requests until its pipe closes."""
    pdf = None
    conn.send_bytes(b"{}")  # ready: the imports are done (a header without pixels, as every reply)
    conn.send_bytes(b"")
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except EOFError:
            return
        header, pixels = {}, b""
        try:
            if request["op"] == "open":
                if pdf is not None:
                    pdf.close()
                pdf = _load(request["path"])
                header["pages"] = len(pdf)
            else:
                image = _render(pdf, request["page"], request["dpi"], request["max_side"])
                header["size"], pixels = image.size, image.tobytes()
        except PdfError as err:
            header = {"reason": err.reason, "detail": err.detail}
        conn.send_bytes(json.dumps(header).encode())
        conn.send_bytes(pixels)


class PdfRenderer:
    """PDFium in a child process (see the module docstring); ``open`` a document, then ``render`` its pages."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._process = self._conn = None
        self._path: str | None = None

    def __enter__(self) -> PdfRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return None if self._process is None else self._process.pid

    def open(self, path: Path) -> int:
        """The page count of ``path``, which later ``render`` calls draw from."""
        self._path = str(path)
        return self._call({"op": "open", "path": self._path}, "opening it")["pages"]

    def render(self, i: int, dpi: float, max_side: int) -> Image.Image:
        """Page ``i`` (0-based) at ``dpi``, its longer side within ``max_side``, as RGB."""
        request = {"op": "render", "page": i, "dpi": dpi, "max_side": max_side}
        header, pixels = self._call(request, f"page {i + 1}", with_pixels=True)
        return Image.frombytes("RGB", tuple(header["size"]), pixels)

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._conn.close()
            self._process = self._conn = None

    def _call(self, request: dict, what: str, with_pixels: bool = False):
        if self._process is None:
            self._start()
            if request["op"] != "open":  # a fresh child: the document again, within the same limit
                self._ask({"op": "open", "path": self._path}, "opening it again")
        header, pixels = self._ask(request, what)
        return (header, pixels) if with_pixels else header

    def _start(self) -> None:
        # A fresh interpreter (not fork: nothing of the caller is inherited; not multiprocessing's spawn, which
        # imports the caller's main script again) on one end of a socket pair.
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", "vrag_rl.retrieval.pdf", str(theirs.fileno())]
        self._process = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._reply(STARTUP_S, "starting PDFium")

    def _ask(self, request: dict, what: str) -> tuple[dict, bytes]:
        self._conn.send_bytes(json.dumps(request).encode())
        header, pixels = self._reply(self.timeout_s, what)
        if "reason" in header:  # PDFium's own error: a page's is named by its page, a document's is the document's
            detail = f"{what}: {header['detail']}" if request["op"] == "render" else header["detail"]
            raise PdfError(header["reason"], detail)
        return header, pixels

    def _reply(self, timeout_s: float, what: str) -> tuple[dict, bytes]:
        """The child's two messages (a JSON header, then the pixels), both within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        try:
            message = []
            for _ in range(2):
                if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                    self.close()
                    raise PdfError("PDF timeout", f"{what}: not done within {timeout_s:g} s (--page-timeout)")
                message.append(self._conn.recv_bytes())
            header, pixels = json.loads(message[0]), message[1]
        except (EOFError, OSError):
            try:
                code = self._process.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            self.close()
            raise PdfError("corrupt PDF", f"{what}: PDFium crashed (exit code {code})") from None
        return header, pixels


if __name__ == "__main__":  # the child: python -m vrag_rl.retrieval.pdf FD
    _serve(Connection(int(sys.argv[1])))
