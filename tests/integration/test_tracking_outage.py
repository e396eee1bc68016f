"""The MLflow server dies in the middle of training: the stage fails within the retry bound,
naming the URI, and running it again (server back) resumes and finishes in a new run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, free_port, tiny_raw, write_params
from nmt import tracking
from nmt.training import LAST_CKPT

FAIL_WITHIN_S = 120  # 2 retries, backoff factor 1, 30 s timeout: a refused connection is fast


def _start_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on a SQLite store in `root`, proxied artifacts, 127.0.0.1 only."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--serve-artifacts", "--artifacts-destination", str(root / "artifacts")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}") from None
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError("mlflow server did not answer /health within 120 s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # as a crash would
        proc.wait(timeout=30)


@pytest.mark.slow
def test_server_killed_mid_training_fails_within_bound_then_run_is_redone(
        tiny_data: dict, tmp_path: Path) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    env.update(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(REPO))
    # long enough to be killed mid-way (checkpoints every 20 steps); the same params resume
    params = write_params(tmp_path / "params.yaml", tiny_raw(
        tracking={"experiment": "outage"},
        train={"max_steps": 200, "max_epochs": 1000, "log_every_steps": 1,
               "val_every_steps": 20}))
    cmd = [sys.executable, str(REPO / "pipelines" / "train.py"), "--params", str(params),
           "--processed", str(tiny_data["processed"]), "--model-dir", str(tmp_path / "models"),
           "--reports", str(tmp_path / "reports")]
    server = _start_server(tmp_path / "store", port)
    try:
        train = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        client = MlflowClient(uri)
        deadline = time.monotonic() + 120
        runs: list = []
        while time.monotonic() < deadline and train.poll() is None:
            exp = client.get_experiment_by_name("outage")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and (tmp_path / "models" / "checkpoints" / LAST_CKPT).is_file():
                break  # training has logged steps and saved a checkpoint to resume from
            time.sleep(0.5)
        assert runs and train.poll() is None, "training never reached a checkpoint"
        first_run = runs[0].info.run_id
        _stop(server)
        killed_at = time.monotonic()
        out, _ = train.communicate(timeout=FAIL_WITHIN_S + 60)
    finally:
        _stop(server)
    took = time.monotonic() - killed_at
    print(f"\nserver killed mid-training: train exited {train.returncode} after {took:.1f} s")
    assert train.returncode == 1, out[-3000:]
    assert took < FAIL_WITHIN_S
    assert f"TrackingError: MLflow store {uri} failed during training" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not (tmp_path / "models" / "run.json").exists()

    # server back (same store): the same command resumes from the checkpoint in a new run
    server = _start_server(tmp_path / "store", port)
    try:
        redo = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        assert redo.returncode == 0, redo.stdout[-3000:] + redo.stderr[-3000:]
        ref = tracking.read_run_json(tmp_path / "models" / "run.json")
        client = MlflowClient(uri)
        assert ref.run_id != first_run
        assert client.get_run(ref.run_id).info.status == "FINISHED"
        assert client.get_run(first_run).info.status in ("KILLED", "FAILED")
        tags = client.get_run(ref.run_id).data.tags
        assert tags.get("resumed_from_run_id") == first_run, tags
    finally:
        _stop(server)
