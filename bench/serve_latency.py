"""Latency and throughput of the REST translator on 127.0.0.1; prints one JSON object.

    python bench/serve_latency.py --url http://127.0.0.1:5000            # a running server
    python bench/serve_latency.py --model models:/fra-eng-translator@champion   # start `nmt serve`
    python bench/serve_latency.py --model models/ --server mlflow  # plain `mlflow models serve`

Measures p50/p95/max latency of one-sentence requests (`--requests`, after `--warmup`) and
sentences/s of `--batches` requests of `--batch-size` sentences, sequentially (one client), all
within `--max-seconds` (the run stops early and says so). Sentences cycle through a fixed list of
short English sentences; decoding uses the model's default beam unless `--beam` is given.
`--model` starts `nmt serve` (MLflow's scoring app behind the request guard of `nmt.rest`, what
users run) with this Python; `--server mlflow` starts `mlflow models serve --env-manager local`
instead, to measure what the guard costs. Either needs `uvicorn` next to this Python, and a
`models:/` URI needs MLFLOW_TRACKING_URI (or `--tracking-uri`) pointing at the registry, or for
`nmt serve` a project (params.yaml) in the working directory. With NMT_INT8=1 in the environment
the server decodes in int8 (the report then says `"int8": true`); with NMT_COMPILE=1 (what `nmt
serve --compile` sets) it compiles a Transformer's encoder and decoder step at start-up
(`"compiled": true`; the first start on a machine compiles for up to a minute, later ones load
the cached libraries).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

SENTENCES = ["Be nice.", "Drop it!", "Get out!", "I am hungry.", "Where is the station?",
             "Tom didn't want to go to school today.", "We need more time.", "It's raining."]


def post(url: str, sentences: list[str], params: dict, timeout: float) -> float:
    """POST one request; returns the wall time in ms (raises on a non-200 answer)."""
    body = json.dumps({"inputs": sentences, "params": params}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()
    return (time.perf_counter() - start) * 1000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def server_command(server: str, model: str, port: int) -> list[str]:
    """The command line that serves `model` on 127.0.0.1:`port`: `nmt serve` or plain MLflow."""
    if server == "nmt":
        return [sys.executable, "-m", "nmt.cli", "serve", "--model", model,
                "--host", "127.0.0.1", "--port", str(port)]
    return [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model,
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]


def start_server(server: str, model: str, tracking_uri: str | None, timeout_s: float
                 ) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    proc = subprocess.Popen(server_command(server, model, port), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    code = proc.poll()
    stop(proc)
    what = (f"exited with code {code}" if code is not None
            else f"not ready within {timeout_s:.0f} s")
    raise SystemExit(f"error: {server} server for {model} {what}; run it by hand to see why: "
                     f"{' '.join(server_command(server, model, port))}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def measure(url: str, args: argparse.Namespace) -> dict:
    params = {"beam_size": args.beam} if args.beam else {}
    deadline = time.monotonic() + args.max_seconds
    for i in range(args.warmup):
        post(url, [SENTENCES[i % len(SENTENCES)]], params, args.timeout)
    single: list[float] = []
    for i in range(args.requests):
        if time.monotonic() > deadline:
            break
        single.append(post(url, [SENTENCES[i % len(SENTENCES)]], params, args.timeout))
    batch_ms: list[float] = []
    for b in range(args.batches):
        if time.monotonic() > deadline:
            break
        batch = [SENTENCES[(b + i) % len(SENTENCES)] for i in range(args.batch_size)]
        batch_ms.append(post(url, batch, params, args.timeout))
    sent = len(batch_ms) * args.batch_size
    return {
        "url": url, "params": params, "host": platform.node(), "cpus": os.cpu_count(),
        "single": {"requests": len(single),
                   "p50_ms": round(statistics.median(single), 1) if single else None,
                   "p95_ms": round(percentile(single, 0.95), 1) if single else None,
                   "max_ms": round(max(single), 1) if single else None},
        "batched": {"requests": len(batch_ms), "batch_size": args.batch_size,
                    "sentences_per_s": round(sent / (sum(batch_ms) / 1000), 2) if sent else None},
        "stopped_early": len(single) < args.requests or len(batch_ms) < args.batches,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:5000")
    target.add_argument("--model", help="model URI to serve, e.g. models:/NAME@champion")
    parser.add_argument("--server", choices=("nmt", "mlflow"), default="nmt",
                        help="with --model: start `nmt serve` (default) or plain `mlflow models "
                             "serve`")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    parser.add_argument("--requests", type=int, default=50, help="one-sentence requests")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=5, help="batched requests")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--beam", type=int, default=None, help="default: the model's beam")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="measurement budget")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request")
    parser.add_argument("--start-timeout", type=float, default=240.0)
    args = parser.parse_args(argv)
    if args.url and urllib.parse.urlsplit(args.url).hostname not in ("127.0.0.1", "localhost"):
        parser.error("--url must be a server on 127.0.0.1 (this benchmark stays local)")
    proc = None
    url = args.url
    try:
        if url is None:
            proc, url = start_server(args.server, args.model, args.tracking_uri,
                                     args.start_timeout)
        report = measure(url, args)
        if proc is not None:  # the server this run started inherits the environment
            report["server"] = args.server
            report["int8"] = os.environ.get("NMT_INT8", "").strip() == "1"
            report["compiled"] = os.environ.get("NMT_COMPILE", "").strip() == "1"
            report["precision"] = (os.environ.get("NMT_PRECISION", "").strip()
                                   or "the model's evaluate.search.precision")
            from nmt.precision import describe_cpu  # lazily: torch

            report["cpu"] = describe_cpu()
        print(json.dumps(report, indent=2))
    except urllib.error.URLError as exc:
        print(f"error: {url}: {exc}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
