"""Two-process DDP on CPU (gloo): the same train stage, `strategy: ddp`, `devices: 2`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, tiny_raw, write_params

pytestmark = pytest.mark.slow


def test_two_process_ddp_on_cpu(tiny_data: dict, tmp_path: Path) -> None:
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    params = write_params(tmp_path / "params.yaml", tiny_raw(
        train={"accelerator": "cpu", "strategy": "ddp", "devices": 2, "num_threads": 1,
               "max_steps": 4, "val_every_steps": 2, "val_bleu_sentences": 8},
        tracking={"tracking_uri": uri}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "pipelines/train.py", "--params", str(params), "--processed",
         str(tiny_data["processed"]), "--model-dir", str(tmp_path / "models"), "--reports",
         str(tmp_path / "reports")], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "distributed_backend=gloo" in log

    metrics = json.loads((tmp_path / "reports/metrics.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == 4 and metrics["val/loss"] > 0
    history = (tmp_path / "reports/history.csv").read_text(encoding="utf-8").splitlines()
    assert [int(row.split(",")[0]) for row in history[1:]] == [2, 4]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(tiny_raw()["tracking"][
        "experiment"]).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 1 logged nothing
    assert runs[0].info.run_id == json.loads((tmp_path / "models/run.json").read_text())[
        "run_id"]
