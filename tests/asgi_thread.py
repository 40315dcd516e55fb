"""An ASGI app served by a real uvicorn from a thread, on a loopback socket bound to a free port."""

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn


@contextlib.contextmanager
def serve_app(app) -> Iterator[str]:
    """Yields the base URL (``http://127.0.0.1:PORT``) while the server runs; stops it on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def request_in_flight(url: str, path: str) -> Iterator[None]:
    """A POST to ``path`` whose body does not arrive (within the server's body timeout), holding one of the server's
    in-flight places while the block runs (the server is seen busy first, and free again after: an unknown path
    answers 503, then 404; ``/health`` is answered outside the limit)."""
    host, port = url.removeprefix("http://").split(":")
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        _wait_for_status(url, 503, "the held request never took its place")
        yield
    _wait_for_status(url, 404, "the held request's place was not given back")


def _wait_for_status(url: str, status: int, why: str) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(url + "/no-such-path", timeout=30).status_code != status:
        assert time.monotonic() < deadline, why
        time.sleep(0.02)
