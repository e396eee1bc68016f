"""nmt.rest.RequestGuard on a stand-in ASGI app (the real scoring server: test_serving.py)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest

from nmt.rest import MAX_MESSAGE_CHARS, THREADS_ENV, RequestGuard, clean_error_body, serve_threads

STACK = "Traceback (most recent call last):\n  File \"/srv/app/secret.py\", line 1\n"


class Inner:
    """Answers like MLflow's scoring app: 200 with the body it read, or an error with a trace."""

    def __init__(self, status: int = 200, message: str = "boom") -> None:
        self.status, self.message, self.calls = status, message, 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.calls += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        out = (body if self.status == 200 else json.dumps(
            {"error_code": "X", "message": self.message, "stack_trace": STACK}).encode())
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})


def call(app: Any, body: bytes, content_type: str = "application/json", path: str = "/invocations",
         chunk: int = 1 << 16) -> tuple[int, dict, bytes]:
    messages = [{"type": "http.request", "body": body[i:i + chunk],
                 "more_body": i + chunk < len(body)} for i in range(0, max(len(body), 1), chunk)]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"content-type", content_type.encode()),
                         (b"content-length", str(len(body)).encode())]}
    asyncio.run(app(scope, receive, send))
    headers = dict(sent[0]["headers"])
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    assert int(headers[b"content-length"]) == len(payload)
    return sent[0]["status"], headers, payload


def test_good_request_passes_through_unchanged() -> None:
    inner = Inner()
    body = json.dumps({"inputs": ["Be nice."]}).encode()
    status, _, payload = call(RequestGuard(inner), body, "application/json; charset=utf-8")
    assert status == 200 and payload == body and inner.calls == 1


@pytest.mark.parametrize(("body", "content_type", "reason"), [
    (b"[" * 100_000 + b"]" * 100_000, "application/json", "nested too deeply"),
    (b'{"inputs": ["Go."]}', "text/csv", "Content-Type 'text/csv' is not accepted"),
    (b'{"inputs": ["Go."]}', "application/json; charset=latin-1", "is not accepted"),
    (b'{"inputs": ["Be nice.",', "application/json", "not valid JSON"),
    (b'{"inputs": ["Caf\xe9"]}', "application/json", "not valid UTF-8 at byte 16"),
    (json.dumps({"inputs": ["x" * 3_000_000]}).encode(), "application/json",
     "the limit is 2,097,152"),
])
def test_bad_bodies_get_a_short_400_without_reaching_the_app(body: bytes, content_type: str,
                                                            reason: str) -> None:
    inner = Inner()
    status, _, payload = call(RequestGuard(inner), body, content_type)
    reply = json.loads(payload)
    assert status == 400 and reason in reply["message"], reply
    assert len(payload) < 400 and "stack_trace" not in reply and inner.calls == 0


def test_body_over_the_limit_without_content_length_is_cut_off() -> None:
    guard = RequestGuard(Inner(), max_body_bytes=1000)
    status, _, payload = call(guard, b'{"inputs": ["' + b"x" * 5000 + b'"]}', chunk=100)
    assert status == 400 and "the limit is 1,000" in json.loads(payload)["message"]


def test_error_bodies_lose_the_stack_trace_and_echo() -> None:
    inner = Inner(status=400, message="Failed to predict data '" + "x" * 30_000 + "'")
    status, headers, payload = call(RequestGuard(inner), b'{"inputs": ["Go."]}')
    reply = json.loads(payload)
    assert status == 400 and "stack_trace" not in reply and "/srv/app" not in payload.decode()
    assert len(reply["message"]) < MAX_MESSAGE_CHARS + 60 and "more characters" in reply["message"]


def test_plain_text_errors_become_short_json() -> None:
    reply = json.loads(clean_error_body(b"Internal Server Error"))
    assert reply["message"] == "Internal Server Error"


def test_other_paths_are_not_touched() -> None:
    inner = Inner()
    status, _, payload = call(RequestGuard(inner), b"not json", "text/plain", path="/ping")
    assert status == 200 and payload == b"not json" and inner.calls == 1


@pytest.mark.parametrize(("requested", "env", "expected"), [
    (None, None, 1), (None, "2", 2), (3, "2", 3), (1, None, 1)])
def test_the_server_decodes_on_one_thread_unless_told(restore_serve_threads: None,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      requested: int | None, env: str | None,
                                                      expected: int) -> None:
    import torch

    if env is not None:
        monkeypatch.setenv(THREADS_ENV, env)
    assert serve_threads(requested) == expected
    assert os.environ[THREADS_ENV] == str(expected) and torch.get_num_threads() == expected


@pytest.mark.parametrize(("requested", "env"), [(0, None), (-2, None), (None, "two"),
                                                (None, "0")])
def test_a_bad_thread_count_is_refused_naming_both_settings(restore_serve_threads: None,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            requested: int | None,
                                                            env: str | None) -> None:
    if env is not None:
        monkeypatch.setenv(THREADS_ENV, env)
    with pytest.raises(ValueError, match=r"threads: must be a whole number >= 1, got .*"
                                         r"\(--threads or OMP_NUM_THREADS\)"):
        serve_threads(requested)
