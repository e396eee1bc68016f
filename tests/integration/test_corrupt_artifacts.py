"""Corrupt local artifacts: one line naming the file and the command that rebuilds it, exit 1.

Covers `models/model.pt`, `models/config.json` and `mlflow.db` in `nmt translate` and the evaluate
and export stages, and the pyfunc's own files when serving loads it. Nothing already produced is
lost: the stages stop before writing.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pipelines.evaluate as evaluate_stage
import pipelines.export as export_stage
import pytest

from conftest import REPO
from nmt.checkpoint import load_model
from nmt.cli import main
from nmt.serving import ArtifactError, TranslatorModel, write_artifacts

pytestmark = pytest.mark.usefixtures("one_thread")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


REBUILD = "rebuild it with `dvc repro train` or restore it with `dvc checkout {path}`"
CORRUPT: dict[str, tuple[str, Callable[[Path], object], str]] = {
    "truncated-model": ("model.pt", _truncate, "not a readable checkpoint (truncated?); "),
    "empty-model": ("model.pt", lambda p: p.write_bytes(b""), "not a readable checkpoint"),
    "broken-config": ("config.json", lambda p: p.write_text("{\n"),
                      "not valid JSON (Expecting property name enclosed in double quotes: "
                      "line 2 column 1 (char 2)); "),
}


def _model_copy(tiny: dict, tmp_path: Path, case: str | None = None) -> Path:
    model_dir = tmp_path / "models"
    shutil.copytree(tiny["model_dir"], model_dir, ignore=shutil.ignore_patterns("checkpoints"))
    if case is not None:
        name, corrupt, _ = CORRUPT[case]
        corrupt(model_dir / name)
    return model_dir


def _evaluate(tiny: dict, model_dir: Path, reports: Path) -> int:
    """The evaluate stage's exit code on `model_dir` (the session's params and test data)."""
    return evaluate_stage.main(["--params", str(tiny["params"]), "--model-dir", str(model_dir),
                                "--processed", str(tiny["processed"]), "--reports", str(reports),
                                "--device", "cpu"])


def _export(tiny: dict, model_dir: Path, metrics: Path, reports: Path) -> int:
    """The export stage's exit code on `model_dir` into `model_dir/export`."""
    return export_stage.main([
        "--params", str(tiny["params"]), "--model-dir", str(model_dir),
        "--eval-metrics", str(metrics), "--test-data",
        str(Path(tiny["processed"]) / "test.parquet"),
        "--attribution", str(REPO / "data/external/ATTRIBUTION.md"),
        "--out-dir", str(model_dir / "export"), "--reports", str(reports)])


def _expected(model_dir: Path, case: str) -> tuple[str, str]:
    name, _, words = CORRUPT[case]
    path = model_dir / name
    return f"{path}: {words}", REBUILD.format(path=path)


@pytest.mark.parametrize("case", list(CORRUPT))
def test_translate_names_the_corrupt_file(tiny_trained: dict, tmp_path: Path, capsys,
                                          case: str) -> None:
    model_dir = _model_copy(tiny_trained, tmp_path, case)
    assert main(["translate", "--params", str(tiny_trained["params"]), "--model", str(model_dir),
                 "Hello."]) == 1
    err = capsys.readouterr().err
    start, rebuild = _expected(model_dir, case)
    assert err.startswith(f"error: {start}") and err.endswith(f"{rebuild}\n")
    assert err.count("\n") == 1  # one line, no traceback


@pytest.mark.parametrize("case", ["truncated-model", "broken-config"])
def test_evaluate_stage_names_the_corrupt_file_and_keeps_old_reports(
        tiny_trained: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    model_dir = _model_copy(tiny_trained, tmp_path, case)
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "metrics.json").write_text('{"test/bleu": 12.5}\n')  # an earlier run's report
    with caplog.at_level(logging.ERROR):
        code = _evaluate(tiny_trained, model_dir, reports)
    assert code == 1
    start, rebuild = _expected(model_dir, case)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        caplog.records[-1].getMessage()]
    message = caplog.records[-1].getMessage()
    assert message.startswith(f"ModelFileError: {start}") and message.endswith(rebuild)
    assert (reports / "metrics.json").read_text() == '{"test/bleu": 12.5}\n'
    assert sorted(p.name for p in reports.iterdir()) == ["metrics.json"]


def _broken_store(tmp_path: Path, tiny: dict, how: str) -> Path:
    db = tmp_path / "mlflow.db"
    source = Path(str(tiny["tracking_uri"]).removeprefix("sqlite:///"))
    if how == "garbage":
        db.write_bytes(b"this is not a database" * 100)
    else:
        db.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return db


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_mlflow_db_is_named_by_evaluate_export_and_translate(
        tiny_trained: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys,
        monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    db = _broken_store(tmp_path, tiny_trained, how)
    model_dir = _model_copy(tiny_trained, tmp_path)
    run = json.loads((model_dir / "run.json").read_text())
    (model_dir / "run.json").write_text(json.dumps(run | {"tracking_uri": f"sqlite:///{db}"}))
    reason = "file is not a database" if how == "garbage" else "database disk image is malformed"
    expected = f"{db}: not a readable MLflow store ({reason}); restore it from a backup"
    reports = tmp_path / "reports"
    metrics = tmp_path / "eval_metrics.json"
    metrics.write_text('{"test/bleu": 20.0}')
    with caplog.at_level(logging.ERROR):
        assert _evaluate(tiny_trained, model_dir, reports / "evaluate") == 1
        assert _export(tiny_trained, model_dir, metrics, reports / "export") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all(expected in e for e in errors)
    assert not reports.exists() and not (model_dir / "export").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert main(["translate", "--params", str(tiny_trained["params"]), "Hello."]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1


def test_export_stage_names_a_truncated_checkpoint(tiny_trained: dict, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    model_dir = _model_copy(tiny_trained, tmp_path, "truncated-model")
    metrics = tmp_path / "eval_metrics.json"
    metrics.write_text('{"test/bleu": 20.0}')
    with caplog.at_level(logging.ERROR):
        assert _export(tiny_trained, model_dir, metrics, tmp_path / "r") == 1
    start, rebuild = _expected(model_dir, "truncated-model")
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert message == f"ModelFileError: {start}{rebuild}"
    assert not (model_dir / "export").exists()


@pytest.mark.parametrize(("artifact", "words"), [
    ("weights", "not readable weights of this model (truncated?"),
    ("config", "not a readable serving config ("),
])
def test_pyfunc_load_names_a_corrupt_artifact(tiny_trained: dict, tmp_path: Path,
                                              artifact: str, words: str) -> None:
    model_dir = Path(tiny_trained["model_dir"])
    model, _, _, params = load_model(model_dir)
    artifacts = write_artifacts(tmp_path / "pyfunc", model, params.model,
                                model_dir / "tokenizers", params.evaluate.search,
                                params.vectorize.max_src_tokens,
                                REPO / "data/external/ATTRIBUTION.md")
    TranslatorModel().load_context(SimpleNamespace(artifacts=artifacts))  # intact: loads
    _truncate(Path(artifacts[artifact]))
    with pytest.raises(ArtifactError) as info:
        TranslatorModel().load_context(SimpleNamespace(artifacts=artifacts))
    message = str(info.value)
    assert message.startswith(f"{artifacts[artifact]}: {words}") and "\n" not in message
    assert message.endswith("log the model again with `dvc repro export` (or `dvc repro "
                            "--force export`)")
