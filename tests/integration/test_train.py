"""The train stage on the tiny profile: outputs, MLflow run, resume, expected failures."""

from __future__ import annotations

import csv
import json
import logging
import math
import multiprocessing as mp
import os
import signal
import socket
import time
from pathlib import Path

import pipelines.train as train_stage
import pytest
import torch
from mlflow.tracking import MlflowClient

import nmt.precision as precision
from conftest import tiny_raw, write_params
from nmt.checkpoint import load_model
from nmt.data.datamodule import pad_sources
from nmt.data.vectorize import load_split
from nmt.specials import BOS_ID


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _args(params: Path, processed: Path, root: Path) -> list[str]:
    return ["--params", str(params), "--processed", str(processed), "--model-dir",
            str(root / "models"), "--reports", str(root / "reports/train")]


@pytest.fixture()
def sqlite_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_train_writes_model_dir_reports_and_mlflow_run(tiny_trained: dict) -> None:
    model_dir, reports = Path(tiny_trained["model_dir"]), Path(tiny_trained["reports"]) / "train"
    run = json.loads((model_dir / "run.json").read_text(encoding="utf-8"))
    assert run["tracking_uri"] == tiny_trained["tracking_uri"] and run["experiment"]

    metrics = json.loads((reports / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == 12 and metrics["val/loss"] > 0  # tiny profile: max_steps 12
    assert 0 <= metrics["val/bleu"] <= 100 and metrics["train/tokens_per_s"] > 0
    history = (reports / "history.csv").read_text(encoding="utf-8").splitlines()
    assert history[0].startswith("step,epoch,val/loss,val/ppl,val/bleu")
    val_steps = [int(r.split(",")[0]) for r in history[1:]]
    assert val_steps == [5, 10, 12]  # val_every_steps 6, rounded to 5 to land on epoch ends; stop

    payload = torch.load(model_dir / "model.pt", weights_only=True)
    assert payload["step"] == metrics["best_step"]
    model, src_tok, trg_tok, params = load_model(model_dir)
    assert params.train.max_steps == 12 and model.trg_vocab_size == trg_tok.vocab_size
    assert (model_dir / "checkpoints" / "last.ckpt").is_file()

    client = MlflowClient(tiny_trained["tracking_uri"])
    got = client.get_run(run["run_id"])
    assert got.info.status == "FINISHED"
    assert got.data.params["train.batch_tokens"] == "400" and "model.hidden" in got.data.params
    assert got.data.tags["stage"] == "train"
    logged = [m.step for m in client.get_metric_history(run["run_id"], "train/loss")]
    assert logged == [2, 4, 6, 8, 10, 12]  # log_every_steps 2
    bleu = client.get_metric_history(run["run_id"], "val/bleu")
    assert [m.step for m in bleu] == val_steps
    stored = _artifacts(client, run["run_id"])
    assert {"model/model.pt", "model/config.json", "tokenizers/meta.json",
            "reports/train/metrics.json", "reports/train/steps.csv"} <= stored
    assert {"samples/step_0000005.md", "samples/step_0000012.md"} <= stored
    sample = client.download_artifacts(run["run_id"], "samples/step_0000012.md")
    text = Path(sample).read_text(encoding="utf-8")
    sources = set(load_split(tiny_trained["processed"], "valid").en)
    assert text.count("- source: ") == 2 and "  - references: " in text  # val_samples 2
    assert any(f"- source: {s}\n" in text for s in sources)


def _slow_train_in_child(args: list[str]) -> None:
    """Forked child (no re-import): train at ~5 steps/s so the kill lands mid-training."""
    from nmt.lit_module import Seq2SeqModule

    torch.set_num_threads(1)  # no OpenMP thread pool inherited through fork
    end = Seq2SeqModule.on_train_batch_end

    def slow_end(self: Seq2SeqModule, *a: object) -> None:
        time.sleep(0.2)
        end(self, *a)  # type: ignore[arg-type]

    Seq2SeqModule.on_train_batch_end = slow_end  # type: ignore[method-assign]
    os._exit(train_stage.main(args))


@pytest.mark.slow
def test_killed_training_resumes_from_last_checkpoint(tiny_data: dict, tmp_path: Path,
                                                      sqlite_uri: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_raw(train={
        "max_steps": 30, "val_every_steps": 5, "num_threads": 1, "val_bleu_sentences": 4}))
    args = _args(params, tiny_data["processed"], tmp_path)
    last = tmp_path / "models/checkpoints/last.ckpt"
    child = mp.get_context("fork").Process(target=_slow_train_in_child, args=(args,))
    child.start()
    deadline = time.monotonic() + 120
    while not last.exists() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join()
    assert last.exists(), "no checkpoint before the kill"
    step = torch.load(last, weights_only=True)["global_step"]
    assert 0 < step < 30
    killed = json.loads((last.parent / "state.json").read_text())["run"]["run_id"]
    client = MlflowClient(sqlite_uri)
    assert client.get_run(killed).info.status == "RUNNING"  # SIGKILL: nothing could end it

    with caplog.at_level(logging.INFO):
        assert train_stage.main(args) == 0
    assert f"resuming from {last} at step {step}" in caplog.text
    assert client.get_run(killed).info.status == "KILLED"
    new = json.loads((tmp_path / "models/run.json").read_text())["run_id"]
    got = client.get_run(new)
    assert got.info.status == "FINISHED" and new != killed
    assert json.loads((tmp_path / "reports/train/metrics.json").read_text())["steps"] == 30
    assert got.data.tags["resumed_from_step"] == str(step)
    assert got.data.tags["resumed_from_run_id"] == killed
    history = (tmp_path / "reports/train/history.csv").read_text().splitlines()[1:]
    steps = [int(r.split(",")[0]) for r in history]
    assert step in steps and steps == sorted(set(steps))  # history kept across the restart
    assert steps[0] <= 5 and steps[-1] == 30
    rows = (tmp_path / "reports/train/steps.csv").read_text().splitlines()[1:]
    logged = [int(r.split(",")[0]) for r in rows]  # progress rows kept across the restart
    assert logged == list(range(2, 31, 2))  # log_every_steps 2
    assert min(m.step for m in client.get_metric_history(new, "train/loss")) > step


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_fails_the_run(tiny_data: dict, tmp_path: Path,
                                                        sqlite_uri: str,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    from nmt.lit_module import Seq2SeqModule

    forward = Seq2SeqModule.forward

    def poisoned(self: Seq2SeqModule, batch: object) -> torch.Tensor:
        logits = forward(self, batch)  # type: ignore[arg-type]
        return logits * float("nan") if self.training and self.global_step == 3 else logits

    monkeypatch.setattr(Seq2SeqModule, "forward", poisoned)
    params = write_params(tmp_path / "params.yaml", tiny_raw())
    with caplog.at_level(logging.ERROR):
        assert train_stage.main(_args(params, tiny_data["processed"], tmp_path)) == 1
    assert "NonFiniteLossError: train/loss is nan at step 3" in caplog.text
    state = json.loads((tmp_path / "models/checkpoints/state.json").read_text())
    assert MlflowClient(sqlite_uri).get_run(state["run"]["run_id"]).info.status == "FAILED"
    assert not (tmp_path / "models/model.pt").exists()


def test_bf16_on_a_cpu_without_bf16_units_fails_before_any_work(
        tmp_path: Path, sqlite_uri: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])  # capability faked absent
    params = write_params(tmp_path / "params.yaml", tiny_raw(train={"precision": "bf16-mixed"}))
    with caplog.at_level(logging.ERROR):  # the processed folder does not even exist
        assert train_stage.main(_args(params, tmp_path / "missing", tmp_path)) == 1
    assert "train.precision: 'bf16-mixed' needs a CPU with bf16 units" in caplog.text
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "models").exists()


@pytest.mark.slow
def test_bf16_mixed_on_cpu_trains_finite_and_saves_a_loadable_fp32_model(
        tiny_data: dict, tmp_path: Path, sqlite_uri: str, one_thread: None) -> None:
    if torch.cuda.is_available() or not precision.cpu_bf16_flags():
        pytest.skip("needs a CPU with bf16 units (amx_bf16 or avx512_bf16)")
    params = write_params(tmp_path / "params.yaml", tiny_raw(train={"precision": "bf16-mixed"}))
    assert train_stage.main(_args(params, tiny_data["processed"], tmp_path)) == 0
    metrics = json.loads((tmp_path / "reports/train/metrics.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == 12 and math.isfinite(metrics["val/loss"])
    rows = list(csv.DictReader((tmp_path / "reports/train/steps.csv").open(encoding="utf-8")))
    assert len(rows) == 6 and all(math.isfinite(float(r["train/loss"])) for r in rows)
    model, src_tok, _, _ = load_model(tmp_path / "models")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    src, lengths = pad_sources([src_tok.encode("hello .")])
    logits = model(src, lengths, torch.tensor([[BOS_ID, 5, 6]]))
    assert torch.isfinite(logits).all()
    run_id = json.loads((tmp_path / "models/run.json").read_text())["run_id"]
    assert MlflowClient(sqlite_uri).get_run(run_id).data.tags["precision"] == "bf16-mixed"


def test_unreachable_tracking_server_fails_before_training(tiny_data: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = write_params(tmp_path / "params.yaml", tiny_raw())
    with caplog.at_level(logging.ERROR):
        assert train_stage.main(_args(params, tiny_data["processed"], tmp_path)) == 1
    assert f"TrackingError: MLflow tracking server {uri} did not answer" in caplog.text
    assert not (tmp_path / "models").exists()
