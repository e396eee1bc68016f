"""The evaluate stage end to end on the tiny trained model, and its expected failures."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pipelines.evaluate as evaluate_stage
import pytest
from mlflow.tracking import MlflowClient

from nmt.data.vectorize import load_split
from nmt.evaluation import HEADLINE

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(tiny: dict, reports: Path, *extra: str, model_dir: Path | None = None) -> list[str]:
    return ["--params", str(tiny["params"]), "--model-dir", str(model_dir or tiny["model_dir"]),
            "--processed", str(tiny["processed"]), "--reports", str(reports), "--device", "cpu",
            *extra]


def _artifacts(client: MlflowClient, run_id: str, path: str) -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.mark.slow
def test_evaluate_writes_reports_and_logs_to_the_train_run(tiny_trained: dict,
                                                           tmp_path: Path) -> None:
    reports = tmp_path / "reports/evaluate"
    assert evaluate_stage.main(_args(tiny_trained, reports)) == 0

    headline = json.loads((reports / "metrics.json").read_text(encoding="utf-8"))
    assert set(headline) == set(HEADLINE)  # the DVC metrics: what a user compares, nothing else
    details = json.loads((reports / "details.json").read_text(encoding="utf-8"))
    assert not set(headline) & set(details)
    metrics = {**headline, **details}
    for key in ("test/bleu", "test/chrf", "test/ter", "test/bleu_greedy", "test/chrf_greedy",
                "test/sentences_per_s", "test/tokens_per_s", "test/sentences_per_s_greedy",
                "test/hit_max_len", "test/hit_max_len_greedy", "test/truncated"):
        assert isinstance(metrics[key], int | float), key
    assert metrics["signature/bleu"].startswith("nrefs:")
    sources, refs = load_split(tiny_trained["processed"], "test").references()
    assert metrics["test/sentences"] == len(sources)
    assert metrics["test/references"] == sum(map(len, refs))
    hyps = (reports / "hypotheses.txt").read_text(encoding="utf-8").split("\n")
    assert len(hyps) == len(sources) + 1 and hyps[-1] == ""

    with (reports / "bleu_by_length.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) >= {"bucket", "sentences", "bleu", "bleu_greedy"}
    assert sum(int(r["sentences"]) for r in rows) == len(sources)

    samples = (reports / "samples.md").read_text(encoding="utf-8")
    assert all(f"**{s}**" in samples for s in ("Be nice.", "Drop it!", "Get out!"))
    assert samples.count("   - beam: ") == 5  # tiny profile: sample_size 5
    assert sorted(p.name for p in (reports / "attention").iterdir()) == ["00.png"]  # heatmaps 1

    run_id = json.loads((tiny_trained["model_dir"] / "run.json").read_text())["run_id"]
    client = MlflowClient(tiny_trained["tracking_uri"])
    run = client.get_run(run_id)
    assert run.data.metrics["test/bleu"] == pytest.approx(metrics["test/bleu"])
    assert run.data.metrics["test/bleu_greedy"] == pytest.approx(metrics["test/bleu_greedy"])
    assert "val/loss" in run.data.metrics  # the same run as training
    assert run.data.tags["sacrebleu/bleu"] == metrics["signature/bleu"]
    assert run.info.status == "FINISHED"
    assert {"reports/evaluate/metrics.json", "reports/evaluate/details.json",
            "reports/evaluate/samples.md",
            "reports/evaluate/bleu_by_length.csv", "reports/evaluate/hypotheses.txt",
            "reports/evaluate/attention/00.png"} <= _artifacts(client, run_id, "reports")


def test_missing_model_dir_exits_1(tiny_trained: dict, tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        code = evaluate_stage.main(_args(tiny_trained, tmp_path / "r",
                                         model_dir=tmp_path / "no-models"))
    assert code == 1
    assert "no-models: not a model folder" in caplog.text
    assert not (tmp_path / "r").exists()


def test_non_utf8_examples_file_exits_1_naming_the_byte(tiny_trained: dict, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "examples.txt"
    bad.write_bytes(b"Be nice.\nGo \xff now.\n")
    with caplog.at_level(logging.ERROR):
        code = evaluate_stage.main(_args(tiny_trained, tmp_path / "r", "--examples", str(bad)))
    assert code == 1
    assert "examples.txt: not valid UTF-8 at byte offset 12 (line 2" in caplog.text


def test_model_dir_without_run_json_exits_1(tiny_trained: dict, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    model_dir = tmp_path / "models"
    shutil.copytree(tiny_trained["model_dir"], model_dir, ignore=shutil.ignore_patterns(
        "run.json", "checkpoints"))
    with caplog.at_level(logging.ERROR):
        code = evaluate_stage.main(_args(tiny_trained, tmp_path / "r", model_dir=model_dir))
    assert code == 1 and "run.json not found" in caplog.text
