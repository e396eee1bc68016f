"""`nmt serve`: MLflow's scoring app for the translator pyfunc, behind a request guard.

MLflow's scoring server (`mlflow models serve`) parses requests before the pyfunc sees them, and
some bad requests never reach it: a deeply nested JSON body raised RecursionError (HTTP 500), a
JSON body sent as `text/csv` failed inside MLflow's DataFrame conversion (400 with a server stack
trace), and errors from `predict` come back prefixed with the whole request (a 30 MB sentence
was echoed back). `RequestGuard` is a plain ASGI middleware in front of that app, for
`POST /invocations` only:

- a body over `MAX_BODY_BYTES` (declared or actually sent) is refused before it is read in full;
- only `application/json` (UTF-8) is accepted, the contract's `{"inputs": [...]}`;
- the body must decode as UTF-8 and parse as JSON, nested at most as deep as Python's parser
  allows (about 1,000 levels);
- every error response (4xx/5xx) leaves without `stack_trace` and with its message cut to
  `MAX_MESSAGE_CHARS`.

Refusals are HTTP 400 with `{"error_code": "BAD_REQUEST", "message": ...}`, the shape MLflow
uses. Other paths (`/ping`, `/health`, `/version`) and successful responses pass through as is.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from nmt.serving import MAX_CHARS, MAX_SENTENCES

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A full request (MAX_SENTENCES sentences of MAX_CHARS characters, each written as a 6-byte JSON
# \uXXXX escape in the worst case) fits with room for params; anything bigger is refused.
MAX_BODY_BYTES = 2 * 1024 * 1024
DRAIN_BYTES = 64 * 1024 * 1024  # a refused body is read (and dropped) up to this, then cut off
MAX_MESSAGE_CHARS = 500  # error messages are cut to this many characters
JSON_TYPE = "application/json"
THREADS_ENV = "OMP_NUM_THREADS"  # OpenMP's own setting, read when torch loads
SERVE_THREADS = 1  # intra-op threads per request by default (see `serve_threads`)


class RequestGuard:
    """ASGI middleware: refuse oversized, non-JSON or unparsable bodies; clean error bodies."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES,
                 max_message_chars: int = MAX_MESSAGE_CHARS) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_message_chars = max_message_chars

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Guard `POST /invocations`; pass everything else through."""
        if not (scope["type"] == "http" and scope.get("method") == "POST"
                and scope.get("path", "").rstrip("/") == "/invocations"):
            await self.app(scope, receive, send)
            return
        body, problem = await self._read(scope, receive)
        if problem is None and body is not None:
            problem = json_problem(body)
        if problem is not None:
            log.warning("refused request: %s", problem)
            await reply(send, 400, {"error_code": "BAD_REQUEST", "message": problem})
            return
        await self.app(scope, _replay(body or b"", receive), self._cleaning(send))

    async def _read(self, scope: Scope, receive: Receive) -> tuple[bytes | None, str | None]:
        """The body, or the reason to refuse it (checked before reading where possible)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        problem = content_type_problem(headers.get("content-type"))
        if problem is not None:
            return None, problem
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _drain(receive)
            return None, self._too_big(int(declared))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, "client disconnected"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _drain(receive)
                return None, self._too_big(size, at_least=True)
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks), None

    def _too_big(self, size: int, at_least: bool = False) -> str:
        return (f"request body is {'over ' if at_least else ''}{size:,} bytes; the limit is "
                f"{self.max_body_bytes:,} (at most {MAX_SENTENCES} sentences of at most "
                f"{MAX_CHARS} characters each): split the request")

    def _cleaning(self, send: Send) -> Send:
        """Wrap `send` so error bodies are buffered, cleaned and re-measured."""
        start: Message | None = None
        chunks: list[bytes] = []

        async def wrapped(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None:
                await send(message)
                return
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body = clean_error_body(b"".join(chunks), self.max_message_chars)
                    await _send_body(send, start, body)

        return wrapped


def content_type_problem(content_type: str | None) -> str | None:
    """Why the request's Content-Type is not accepted, or None for UTF-8 JSON."""
    parts = [p.strip().lower() for p in (content_type or "").split(";")]
    charset = next((p.partition("=")[2].strip('"') for p in parts[1:]
                    if p.startswith("charset=")), "utf-8")
    if parts[0] == JSON_TYPE and charset == "utf-8":
        return None
    shown = (content_type or "none")[:100]
    return (f"Content-Type {shown!r} is not accepted: send a JSON body {{\"inputs\": [\"...\"]}} "
            f"with Content-Type: {JSON_TYPE} (UTF-8)")


def json_problem(body: bytes) -> str | None:
    """Why `body` is not a JSON document, or None when it parses."""
    try:
        json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return f"request body is not valid UTF-8 at byte {exc.start}: send UTF-8 JSON"
    except json.JSONDecodeError as exc:
        return (f"request body is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                f"{exc.colno}); send {{\"inputs\": [\"...\"]}}")
    except RecursionError:
        return "request body is JSON nested too deeply; send {\"inputs\": [\"...\"]}"
    return None


def clean_error_body(body: bytes, max_chars: int = MAX_MESSAGE_CHARS) -> bytes:
    """An error body without `stack_trace` and with its message (or text) cut to `max_chars`."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        payload = body.decode("utf-8", errors="replace").strip()
    if not isinstance(payload, dict):  # plain text (e.g. "Internal Server Error"): wrap it
        text = payload if isinstance(payload, str) else json.dumps(payload)
        payload = {"error_code": "ERROR", "message": text}
    payload.pop("stack_trace", None)
    if isinstance(payload.get("message"), str):
        payload["message"] = cut(payload["message"], max_chars)
    return json.dumps(payload).encode()


def cut(text: str, max_chars: int) -> str:
    """`text`, or its first `max_chars` characters plus a note of how much was left out."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}... ({len(text) - max_chars:,} more characters not shown)"


async def reply(send: Send, status: int, payload: dict[str, str]) -> None:
    """Send a complete JSON response."""
    start = {"type": "http.response.start", "status": status, "headers": []}
    await _send_body(send, start, json.dumps(payload).encode())


async def _send_body(send: Send, start: Message, body: bytes) -> None:
    headers = [(k, v) for k, v in start.get("headers", [])
               if k.lower() not in (b"content-length", b"content-type")]
    headers += [(b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())]
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _drain(receive: Receive) -> None:
    """Read and drop the rest of a refused body (up to DRAIN_BYTES), so the client, still
    sending, gets the 400 instead of a connection reset; memory stays bounded."""
    dropped, more = 0, True
    while more and dropped <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        more = message.get("more_body", False)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the already-read body over once, then waits on the client."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def build_app(model_uri: str) -> ASGIApp:
    """Load the pyfunc at `model_uri` into MLflow's scoring app, behind `RequestGuard`."""
    import mlflow
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(model_uri)
    return RequestGuard(scoring_server.init(model))


def serve_threads(requested: int | None = None) -> int:
    """Set the intra-op threads the server decodes with; returns the count.

    `requested` (`nmt serve --threads`), else OMP_NUM_THREADS when the user set it, else
    `SERVE_THREADS`. MLflow's scoring app runs `predict` on worker threads; there a second
    OpenMP thread wakes up slowly for every one of a step's small products (OpenMP spins less
    once the threads outnumber the cores), so one thread is faster. Measured with
    `bench/serve_latency.py` (beam 5) on a 2-core Xeon with AMX: one sentence p50 / p95 41 / 93
    -> 19-20 / 39-41 ms in bf16 and 31 / 71 -> 14 / 29 ms in fp32; batches of 64 sentences
    315-320 -> 507-509 sentences/s in bf16 (reports/bench/serve_threads_amx.json). (On a 2-core
    avx2 EPYC one sentence went 72 -> 52 ms, batches 145 -> 126 sentences/s: a batch-only server
    there may want `--threads 2`.) OpenMP reads the setting when torch loads, so this runs
    before the model does.
    """
    value = os.environ.get(THREADS_ENV, "").strip() if requested is None else str(requested)
    threads = SERVE_THREADS if not value else _positive(value)
    os.environ[THREADS_ENV] = str(threads)
    if "torch" in sys.modules:  # already loaded (e.g. in-process): this thread at least
        sys.modules["torch"].set_num_threads(threads)
    log.info("decoding on %d intra-op thread%s per request (--threads, %s)", threads,
             "" if threads == 1 else "s", THREADS_ENV)
    return threads


def _positive(value: str) -> int:
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"threads: must be a whole number >= 1, got {value!r} (--threads or "
                         f"{THREADS_ENV})")
    return threads


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5001) -> None:
    """Serve `model_uri` over HTTP until interrupted (one uvicorn worker); call
    `serve_threads` first."""
    import uvicorn

    uvicorn.run(build_app(model_uri), host=host, port=port, log_level="info")
