"""`nmt translate`: arguments, stdin, model references (folder, runs:/, models:/), errors."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import mlflow
import pytest
from test_export_registry import NAME, export_once

import nmt.precision as hw
from conftest import tiny_raw, write_params
from nmt import cli
from nmt.serving import INT8_ENV, MAX_SENTENCES, PRECISION_ENV, int8_requested


@pytest.fixture()
def exported(tiny_trained: dict, tmp_path_factory: pytest.TempPathFactory,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    paths = export_once(tiny_trained, tmp_path_factory)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", paths["uri"])
    yield paths
    mlflow.set_tracking_uri(None)  # the CLI sets it; leave MLflow as other tests expect


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[str], str]:
    rc = cli.main(["translate", *argv])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def test_arguments_with_the_default_champion(exported: dict, capsys) -> None:
    rc, lines, err = run(capsys, "--params", exported["params"], "Be nice.", "Get out!")
    assert rc == 0, err
    assert len(lines) == 2 and all(lines)


def test_stdin_lines_keep_empty_lines(exported: dict, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Drop it!\n\nGo.\n"))
    rc, lines, err = run(capsys, "--params", exported["params"], "-")
    assert rc == 0, err
    assert len(lines) == 3 and lines[0] and lines[1] == "" and lines[2]


def test_local_model_dir_with_nbest(exported: dict, capsys) -> None:
    rc, lines, err = run(capsys, "--params", exported["params"], "--model", exported["model_dir"],
                         "--beam", "2", "--nbest", "2", "--batch-size", "1", "Go.", "Who?")
    assert rc == 0, err
    assert [line.split("\t")[0] for line in lines] == ["0", "0", "1", "1"]
    scores = [float(line.split("\t")[1]) for line in lines]
    assert scores[0] >= scores[1] and scores[2] >= scores[3]


def test_runs_uri(exported: dict, capsys) -> None:
    rc, lines, err = run(capsys, "--params", exported["params"], "--model",
                         f"runs:/{exported['run_id']}/translator", "--beam", "1", "Be nice.")
    assert rc == 0, err
    assert len(lines) == 1 and lines[0]


def test_missing_model_folder(exported: dict, capsys, tmp_path) -> None:
    rc, lines, err = run(capsys, "--params", exported["params"], "--model",
                         str(tmp_path / "nothing"), "Go.")
    assert rc == 1 and lines == []
    assert "dvc repro train" in err


def test_empty_registry_names_the_command(exported: dict, capsys, tmp_path) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_raw(
        tracking={"tracking_uri": exported["uri"]}, export={"registered_model": "no-such"}))
    rc, _, err = run(capsys, "--params", str(params), "Go.")
    assert rc == 1
    assert "no-such" in err and "dvc repro export" in err


def test_missing_store_is_not_created(exported: dict, capsys, tmp_path, monkeypatch) -> None:
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    rc, _, err = run(capsys, "--params", exported["params"], "Go.")
    assert rc == 1 and "dvc repro" in err
    assert not db.exists()


def test_request_outside_the_contract_is_an_error(exported: dict, capsys) -> None:
    rc, _, err = run(capsys, "--params", exported["params"], "--beam", "0", "Go.")
    assert rc == 1 and err.strip() == "error: --beam: must be in [1, 64], got 0"
    assert NAME


@pytest.mark.parametrize("ref", ["model_dir", "runs"])
def test_int8_decoding_of_a_folder_and_of_the_pyfunc(exported: dict, capsys, ref: str) -> None:
    model = (exported["model_dir"] if ref == "model_dir"
             else f"runs:/{exported['run_id']}/translator")
    args = ["--params", exported["params"], "--model", model, "--beam", "2", "Be nice.", "Go."]
    rc, fp32, err = run(capsys, *args)
    assert rc == 0, err
    rc, int8, err = run(capsys, *args, "--int8")
    assert rc == 0, err
    assert len(int8) == len(fp32) == 2 and all(int8)


def test_serving_env_switches_the_pyfunc_to_int8(exported: dict,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"runs:/{exported['run_id']}/translator"
    monkeypatch.setenv(INT8_ENV, "1")
    assert mlflow.pyfunc.load_model(uri).unwrap_python_model().translator.int8
    monkeypatch.setenv(INT8_ENV, "0")
    assert not mlflow.pyfunc.load_model(uri).unwrap_python_model().translator.int8
    monkeypatch.setenv(INT8_ENV, "yes")
    with pytest.raises(ValueError, match="NMT_INT8='yes': use 1"):
        int8_requested()


def test_pyfunc_ships_the_shortlist_and_full_vocab_turns_it_off(exported: dict, capsys) -> None:
    from nmt.model_ref import _load_pyfunc

    uri = f"runs:/{exported['run_id']}/translator"
    shortlisted = _load_pyfunc(uri, int8=False, full_vocab=False).unwrap_python_model()
    assert shortlisted.translator.shortlist is not None
    assert shortlisted.translator.shortlist.top_k == 100  # the tiny profile keeps the default
    full = _load_pyfunc(uri, int8=True, full_vocab=True).unwrap_python_model().translator
    assert full.shortlist is None and full.int8
    for model in (exported["model_dir"], uri):
        args = ["--params", exported["params"], "--model", model, "--beam", "2", "Be nice."]
        rc, lines, err = run(capsys, *args, "--full-vocab")
        assert rc == 0 and len(lines) == 1 and lines[0], err


def binary_stdin(data: bytes) -> io.TextIOWrapper:
    """A stdin like the terminal's: bytes underneath (`.buffer`), UTF-8 text on top."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")


@pytest.mark.parametrize("ref", ["champion", "model_dir"])
def test_invalid_utf8_line_is_reported_and_the_rest_translated(exported: dict, capsys,
                                                               monkeypatch, ref: str) -> None:
    monkeypatch.setattr("sys.stdin", binary_stdin(b"Caf\xe9 time.\nBe nice.\n\nGo.\n"))
    model = [] if ref == "champion" else ["--model", exported["model_dir"]]
    rc, lines, err = run(capsys, "--params", exported["params"], *model)
    assert rc == 1
    assert len(lines) == 4 and lines[0] == "" and lines[1] and lines[2] == "" and lines[3]
    assert "stdin line 1: not valid UTF-8 at byte 3" in err and "1 of 4 lines" in err
    assert "Traceback" not in err and "RuntimeError" not in err


def test_argument_with_undecodable_bytes_is_reported(exported: dict, capsys) -> None:
    # Python hands over undecodable argv bytes as lone surrogates (surrogateescape)
    rc, lines, err = run(capsys, "--params", exported["params"], "--model",
                         exported["model_dir"], "Caf\udce9 time.", "Be nice.")
    assert rc == 1 and len(lines) == 2 and lines[0] == "" and lines[1]
    assert "argument 1: not valid UTF-8 at character 3 (byte 0xe9)" in err


def test_over_long_line_is_reported_not_fatal(exported: dict, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Go.\n" + "x" * 5000 + "\nBe nice.\n"))
    rc, lines, err = run(capsys, "--params", exported["params"], "--beam", "1")
    assert rc == 1 and len(lines) == 3 and lines[0] and lines[1] == "" and lines[2]
    assert "stdin line 2: 5,000 characters; the limit is 1000" in err


def test_more_stdin_lines_than_one_request_holds(exported: dict, capsys, monkeypatch) -> None:
    n = MAX_SENTENCES + 44
    monkeypatch.setattr("sys.stdin", io.StringIO("Go.\nBe nice.\n" * (n // 2)))
    rc, lines, err = run(capsys, "--params", exported["params"], "--beam", "1")
    assert rc == 0, err
    assert len(lines) == n and all(lines)


def test_works_from_any_folder(exported: dict, capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # no params.yaml here or above
    rc, lines, err = run(capsys, "--model", exported["model_dir"], "--beam", "1", "Go.")
    assert rc == 0 and len(lines) == 1 and lines[0], err
    # MLFLOW_TRACKING_URI (set by the fixture) is enough for the registered champion
    rc, lines, err = run(capsys, "--beam", "1", "Go.")
    assert rc == 0 and len(lines) == 1 and lines[0], err


def test_finds_the_project_from_a_subfolder(exported: dict, capsys, monkeypatch,
                                            tmp_path) -> None:
    project = tmp_path / "project"
    (project / "docs" / "deep").mkdir(parents=True)
    (project / "params.yaml").write_text(open(exported["params"]).read())
    (project / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(project / "docs" / "deep")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the store must come from the project's params
    rc, lines, err = run(capsys, "--beam", "1", "Go.")
    assert rc == 0 and len(lines) == 1 and lines[0], err


@pytest.mark.parametrize("ref", ["model_dir", "runs"])
def test_precision_switch_of_a_folder_and_of_the_pyfunc(
        exported: dict, capsys, ref: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    model = (exported["model_dir"] if ref == "model_dir"
             else f"runs:/{exported['run_id']}/translator")
    args = ["--params", exported["params"], "--model", model, "--beam", "2", "Be nice.", "Go."]
    monkeypatch.setattr(hw, "cpu_bf16_flags", lambda: ["amx_bf16"])
    outputs = {}
    for precision in ("fp32", "bf16"):
        rc, outputs[precision], err = run(capsys, *args, "--precision", precision)
        assert rc == 0, err
    assert len(outputs["bf16"]) == len(outputs["fp32"]) == 2 and all(outputs["bf16"])
    monkeypatch.setattr(hw, "cpu_bf16_flags", lambda: [])  # a CPU without bf16 units
    rc, out, err = run(capsys, *args, "--precision", "bf16")
    errors = [line for line in err.splitlines() if line.startswith("error")]  # no MLflow bars
    assert rc == 1 and not out and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: --precision: 'bf16' needs a CPU with bf16 units")
    with caplog.at_level(logging.WARNING, logger="nmt.decode_precision"):
        rc, out, err = run(capsys, *args, "--precision", "auto")
    assert rc == 0 and len(out) == 2, err
    assert "--precision auto: this CPU" in caplog.text and "decoding in fp32" in caplog.text


@pytest.mark.usefixtures("restore_serve_threads")
def test_serving_env_sets_the_pyfunc_precision(exported: dict, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    uri = f"runs:/{exported['run_id']}/translator"
    monkeypatch.setattr(hw, "cpu_bf16_flags", lambda: ["amx_bf16"])
    for value in ("fp32", "bf16"):
        monkeypatch.setenv(PRECISION_ENV, value)
        assert mlflow.pyfunc.load_model(uri).unwrap_python_model().translator.precision == value
    monkeypatch.setenv(PRECISION_ENV, "fp16")
    with pytest.raises(Exception, match="NMT_PRECISION: must be one of auto, fp32, bf16"):
        mlflow.pyfunc.load_model(uri)
    rc = cli.main(["serve", "--model", uri, "--params", exported["params"], "--port", "1"])
    out, err = capsys.readouterr()  # it fails at load, before any port is opened
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 1 and not out and "Traceback" not in err
    assert errors == ["error: NMT_PRECISION: must be one of auto, fp32, bf16, got 'fp16'"]
