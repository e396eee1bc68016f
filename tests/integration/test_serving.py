"""`nmt serve` (MLflow's scoring app behind nmt.rest.RequestGuard) on the champion of the
session's export, over 127.0.0.1 only.

One server for the module (started in a subprocess group, killed in a finally). Each bad request
must get a 4xx with a short message and no stack trace, and a good request must still succeed
right after it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_export_registry import NAME, export_once

from conftest import REPO, free_port
from nmt.serving import MAX_CHARS, MAX_SENTENCES

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 240  # the server imports torch, lightning and mlflow on a shared 2-core CPU
GOOD = ["Be nice.", "Drop it!", "Get out!"]


MAX_ERROR_BODY = 1000  # bytes: an error never echoes the request or carries a stack trace


def post(url: str, body: bytes | dict, timeout: float = 120,
         content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        assert len(raw) < MAX_ERROR_BODY and b"stack_trace" not in raw, raw[:2000]
        return exc.code, json.loads(raw or b"{}")


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"server not ready after {timeout_s} s")


def start_server(uri: str, model: str, log_path: Path, *extra: str,
                 **env_extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               **env_extra)
    cmd = [sys.executable, "-m", "nmt.cli", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log_path.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (mlflow + uvicorn child), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tiny_trained: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    paths = export_once(tiny_trained, tmp_path_factory)
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    proc, url = start_server(paths["uri"], f"models:/{NAME}@champion", log_path)
    try:
        wait_ready(url, proc, START_TIMEOUT_S)
        yield url
    except AssertionError:
        print(log_path.read_text(errors="replace")[-4000:])
        raise
    finally:
        stop_server(proc)


def assert_good(url: str) -> None:
    status, body = post(url, {"inputs": GOOD})
    assert status == 200, body
    predictions = body["predictions"]
    assert len(predictions) == len(GOOD)
    assert all(isinstance(p["translation"], str) and p["translation"] for p in predictions)


def test_tutorial_examples(server: str) -> None:
    assert_good(server)
    status, body = post(server, {"inputs": ["Be nice."], "params": {"beam_size": 2, "nbest": 2}})
    assert status == 200
    hyps = body["predictions"][0]["nbest"]
    assert len(hyps) == 2 and hyps[0]["score"] >= hyps[1]["score"]


@pytest.mark.parametrize(("body", "message"), [
    (b'{"inputs": ["Be nice.",', "JSON"),
    ({"inputs": [1, 2]}, "Expected type str"),
    ({"inputs": ["Be nice.", None]}, "Expected type str"),
    ({"inputs": [""]}, "empty sentence"),
    ({"inputs": ["x" * 10_000]}, f"the limit is {MAX_CHARS}"),
    ({"inputs": ["Go."] * 1000}, f"the limit is {MAX_SENTENCES}"),
    ({"inputs": ["Go."], "params": {"beam_size": 100}}, "beam_size"),
    ({"text": ["Go."]}, "inputs"),
    ({"inputs": ["\udcff bad"]}, "input 0: not valid UTF-8 at character 0 (byte 0xff)"),
    ({"inputs": ["Be nice.", "x" * 30_000_000]}, "request body is 30,000,"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
])
def test_bad_requests_get_4xx_and_server_keeps_serving(server: str, body: bytes | dict,
                                                       message: str) -> None:
    status, reply = post(server, body)
    assert 400 <= status < 500, reply
    assert message in reply.get("message", ""), reply
    assert_good(server)


def test_json_sent_as_csv_gets_a_short_400(server: str) -> None:
    status, reply = post(server, {"inputs": GOOD}, content_type="text/csv")
    assert status == 400 and "Content-Type 'text/csv' is not accepted" in reply["message"]
    assert_good(server)


def test_long_sentence_under_the_char_limit_is_truncated(server: str) -> None:
    status, body = post(server, {"inputs": ["I am here. " * 80],  # 880 characters
                                 "params": {"beam_size": 1}})
    assert status == 200 and body["predictions"][0]["truncated"] is True


def test_latency_bench_against_the_server(server: str) -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench/serve_latency.py"), "--url", server,
                          "--requests", "5", "--batches", "2", "--batch-size", "8",
                          "--max-seconds", "60"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["single"]["requests"] == 5 and report["single"]["p50_ms"] > 0
    assert report["batched"]["sentences_per_s"] > 0


@pytest.mark.parametrize(("server", "command"), [(None, "-m nmt.cli serve --model"),
                                                 ("mlflow", "mlflow models serve -m")])
def test_latency_bench_starts_nmt_serve_unless_told(server: str | None, command: str,
                                                    tmp_path: Path) -> None:
    """`--model` starts `nmt serve` by default (`--server mlflow`: plain MLflow); a server that
    cannot start is a one-line error naming the command to run by hand, exit 1."""
    missing = tmp_path / "no-model"
    extra = [] if server is None else ["--server", server]
    out = subprocess.run([sys.executable, str(REPO / "bench/serve_latency.py"), "--model",
                          str(missing), *extra, "--requests", "1", "--start-timeout", "120"],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert f"{command} {missing}" in lines[0]
    assert "Traceback" not in out.stderr


def test_compiled_transformer_serves_what_eager_decoding_gives(tiny_compiled: dict,
                                                               tmp_path: Path) -> None:
    """`nmt serve --compile` on a Transformer's pyfunc folder: the decoder step is compiled at
    load (here from the session's cache) and the translations are the eager Translator's."""
    import mlflow

    from nmt.config import SearchConfig
    from nmt.export.pyfunc import build_pyfunc_spec
    from nmt.translator import Translator

    search = SearchConfig(beam_size=3, length_penalty=0.6, max_len_ratio=1.5, max_len_offset=4,
                          nbest=1, batch_size=4, precision="fp32")
    translator = Translator(tiny_compiled["model"], tiny_compiled["src_tok"],
                            tiny_compiled["trg_tok"], search, 12)
    work = tmp_path / "work"
    work.mkdir()
    spec = build_pyfunc_spec(translator, tiny_compiled["cfg"], tiny_compiled["model_dir"],
                             REPO / "data/external/ATTRIBUTION.md", work)
    mlflow.pyfunc.save_model(path=str(tmp_path / "pyfunc"), **spec.kwargs())
    log_path = tmp_path / "server.log"
    proc, url = start_server(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "pyfunc"),
                             log_path, "--compile", NMT_COMPILE_CACHE=str(tiny_compiled["cache"]))
    try:
        wait_ready(url, proc, START_TIMEOUT_S)
        status, body = post(url, {"inputs": GOOD + ["Tom ate an apple."]})
        status_greedy, greedy = post(url, {"inputs": GOOD, "params": {"beam_size": 1}})
    finally:
        stop_server(proc)
    log = log_path.read_text(errors="replace")
    assert status == status_greedy == 200, (body, greedy, log[-3000:])
    assert "decoding precision: fp32, compiled decoder step" in log, log[-3000:]
    want = translator.translate(GOOD + ["Tom ate an apple."])
    assert [p["translation"] for p in body["predictions"]] == [t.text for t in want]
    assert [p["score"] for p in body["predictions"]] == pytest.approx(
        [t.scores[0] for t in want], abs=1e-5)
    assert [p["translation"] for p in greedy["predictions"]] == [
        t.text for t in translator.translate(GOOD, beam_size=1)]
