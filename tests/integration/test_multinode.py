"""Two nodes x one process, launched with torchrun over 127.0.0.1 (gloo, CPU, tiny profile).

Both launches run the same train stage with `train.num_nodes: 2`, `train.devices: 1`,
`train.strategy: ddp` (docs/scale-out.md). Node 1 gets its own model and reports folders, as if
they were on its local disk: only rank 0 writes the model folder and the one MLflow run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, free_port, tiny_raw, write_params
from nmt.checkpoint import MODEL_FILE, RUN_FILE
from nmt.config import parse_params
from nmt.data.datamodule import TranslationDataModule, rows_digest

pytestmark = pytest.mark.slow


def _launch(node_rank: int, port: int, params: Path, processed: Path, out: Path,
            env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
         "pipelines/train.py", "--params", str(params), "--processed", str(processed),
         "--model-dir", str(out / "models"), "--reports", str(out / "reports")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_nodes_with_torchrun(tiny_data: dict, tmp_path: Path) -> None:
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    raw = tiny_raw(train={"accelerator": "cpu", "strategy": "ddp", "num_nodes": 2,
                          "devices": 1, "num_threads": 1, "max_steps": 4, "val_every_steps": 2,
                          "val_bleu_sentences": 8}, tracking={"tracking_uri": uri})
    params = write_params(tmp_path / "params.yaml", raw)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("MLFLOW_TRACKING_URI", None)
    port = free_port()
    nodes = [_launch(rank, port, params, tiny_data["processed"], tmp_path / f"node{rank}", env)
             for rank in (0, 1)]
    logs = []
    for proc in nodes:
        try:
            logs.append(proc.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
    for rank, (proc, log) in enumerate(zip(nodes, logs, strict=True)):
        assert proc.returncode == 0, f"node {rank}:\n{log[-4000:]}"
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1] and "distributed_backend=gloo" in logs[0]

    # each rank trained on its own slice of the data: the digests it logged are those of
    # the rank's slice, and the slices differ (disjoint)
    seen = {int(m[0]): m[1] for log in logs
            for m in re.findall(r"rank (\d) of 2: train rows of epoch 0 digest (\w+)", log)}
    dm = TranslationDataModule(tiny_data["processed"], parse_params(raw).train,
                               parse_params(raw).seed, world_size=2)
    dm.setup("fit")
    samplers = [dm._train_sampler(rank, dm.batches_per_epoch) for rank in (0, 1)]
    assert seen == {rank: rows_digest(s) for rank, s in enumerate(samplers)}
    rows = [set(np.concatenate(s._rank_batches(0)).tolist()) for s in samplers]
    assert rows[0] and rows[1] and not rows[0] & rows[1]

    # one MLflow run, one model folder (rank 0's); node 1's folders got no file
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(raw["tracking"]["experiment"])
                               .experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    models = tmp_path / "node0/models"
    assert (models / MODEL_FILE).is_file()
    assert json.loads((models / RUN_FILE).read_text())["run_id"] == runs[0].info.run_id
    assert json.loads((tmp_path / "node0/reports/metrics.json").read_text())["steps"] == 4
    assert not [p for p in (tmp_path / "node1").rglob("*") if p.is_file()]
