"""A scripted HTTP server on 127.0.0.1 (stdlib only) for download tests.

Each path gets a list of responders; request k to that path uses responder k, and the last one
repeats. A responder is a function of the request handler that writes the whole response, so a
test can send 500s, truncated bodies, slow bodies or endless chunked streams.

    with ScriptedServer() as server:
        server.route("/a.zip", status(500), ok(payload))
        url = server.url("/a.zip")
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

Responder = Callable[["_Handler"], None]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # needed for chunked bodies
    server: _Server

    def do_GET(self) -> None:
        self.server.scripted.record(self.path, dict(self.headers.items()))
        self.server.scripted.responder(self.path)(self)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output quiet

    @property
    def stop(self) -> threading.Event:
        """Set when the server closes; slow responders wait on it instead of sleeping."""
        return self.server.scripted.stop


class _Server(ThreadingHTTPServer):
    scripted: ScriptedServer

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that time out or give up make the handler hit a closed socket


class ScriptedServer:
    """ThreadingHTTPServer on 127.0.0.1, port 0, serving scripted responses in a thread."""

    def __init__(self) -> None:
        self.routes: dict[str, list[Responder]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.scripted = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def route(self, path: str, *responders: Responder) -> str:
        """Script the responses for `path`; return its URL."""
        self.routes[path] = list(responders)
        return self.url(path)

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def hits(self, path: str) -> int:
        with self._lock:
            return sum(1 for p, _ in self.requests if p == path)

    def record(self, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((path, headers))

    def responder(self, path: str) -> Responder:
        script = self.routes.get(path) or [status(404)]
        return script[min(self.hits(path), len(script)) - 1]


def ok(body: bytes, *, chunked: bool = False) -> Responder:
    """200 with `body`, sent with a Content-Length or as chunked transfer encoding."""

    def respond(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/zip")
        if chunked:
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for i in range(0, len(body), 4096):
                piece = body[i : i + 4096]
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            h.wfile.write(b"0\r\n\r\n")
        else:
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

    return respond


def status(code: int) -> Responder:
    """An error status with a small text body."""

    def respond(h: _Handler) -> None:
        body = f"status {code}\n".encode()
        h.send_response(code)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return respond


def truncated(body: bytes, declared: int) -> Responder:
    """200 declaring `declared` bytes, sending `body` (shorter), then closing the connection."""

    def respond(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(declared))
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()
        h.close_connection = True

    return respond


def slow(body: bytes, *, delay_s: float, after_bytes: int = 0) -> Responder:
    """200 that goes silent for `delay_s` before the headers (after_bytes=0) or mid-body."""

    def respond(h: _Handler) -> None:
        if not after_bytes and h.stop.wait(delay_s):
            return
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[:after_bytes])
        h.wfile.flush()
        if after_bytes and h.stop.wait(delay_s):
            return
        h.wfile.write(body[after_bytes:])

    return respond


def endless_chunks(chunk: bytes, *, max_chunks: int = 100_000) -> Responder:
    """200 with chunked encoding and no length that keeps growing until the client hangs up."""

    def respond(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for _ in range(max_chunks):
            if h.stop.is_set():
                return
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        h.wfile.write(b"0\r\n\r\n")

    return respond
