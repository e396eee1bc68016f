"""The stage wrapper (`nmt.stage`) and the scripts in pipelines/ that use it."""

from __future__ import annotations

import argparse
import ast
import importlib
import logging
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from nmt.config import Params
from nmt.stage import DEBUG_ENV, run_stage, stage_parser

STAGES = sorted(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
SCRIPTS = {s: REPO / "pipelines" / f"{s}.py" for s in STAGES
           if (REPO / "pipelines" / f"{s}.py").is_file()}


def _cmd_args(stage: str, tmp_path: Path) -> list[str]:
    """The stage's dvc.yaml command-line options, with every path moved under `tmp_path`."""
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()
    args = cmd[2:]  # drop `python pipelines/<stage>.py`
    return [a if a.startswith("--") else str(tmp_path / a) for a in args]


@pytest.mark.parametrize("stage", sorted(SCRIPTS))
def test_bad_params_give_one_line_and_exit_1(stage: str, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\n", encoding="utf-8")
    module = importlib.import_module(f"pipelines.{stage}")
    with caplog.at_level(logging.ERROR):
        code = module.main([*_cmd_args(stage, tmp_path), "--params", str(params)])
    assert code == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].getMessage().startswith("ConfigError: download: missing")
    assert "\n" not in errors[0].getMessage() and errors[0].exc_info is None


@pytest.mark.parametrize("stage", sorted(SCRIPTS))
def test_no_default_paths_besides_dvc_yaml(stage: str) -> None:
    """dvc.yaml holds the paths: a path option of a stage script has no default of its own."""
    tree = ast.parse(SCRIPTS[stage].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            option = node.args[0].value if node.args else "?"
            if option == "--params":  # the params file is not a dvc.yaml path
                continue
            for kw in node.keywords:
                if kw.arg == "default" and isinstance(kw.value, ast.Call):
                    pytest.fail(f"pipelines/{stage}.py {option}: default "
                                f"{ast.unparse(kw.value)} duplicates dvc.yaml")


def _parser() -> argparse.ArgumentParser:
    return stage_parser("test stage")


def test_unexpected_error_is_one_line_with_the_traceback_file(
        tmp_path: Path, tiny_params_file: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))

    def body(args: argparse.Namespace, params: Params) -> int:
        raise KeyError("boom")

    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    with caplog.at_level(logging.ERROR):
        code = run_stage("demo", _parser(), ["--params", str(tiny_params_file)], body)
    assert code == 1
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    message = record.getMessage()
    assert "KeyError: 'boom'" in message and DEBUG_ENV in message
    saved = next(tmp_path.glob("nmt-demo-*.traceback.txt"))
    assert str(saved) in message
    assert "Traceback (most recent call last)" in saved.read_text()
    assert 'raise KeyError("boom")' in saved.read_text()


def test_debug_env_reraises(tiny_params_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEBUG_ENV, "1")

    def body(args: argparse.Namespace, params: Params) -> int:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        run_stage("demo", _parser(), ["--params", str(tiny_params_file)], body)


def test_expected_error_types_are_one_line(tiny_params_file: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    class DemoError(RuntimeError):
        pass

    def body(args: argparse.Namespace, params: Params) -> int:
        raise DemoError("the server at\nhttp://x did not answer")

    with caplog.at_level(logging.ERROR):
        code = run_stage("demo", _parser(), ["--params", str(tiny_params_file)], body,
                         expected=(DemoError,))
    assert code == 1
    assert "DemoError: the server at http://x did not answer" in caplog.text
    assert "traceback" not in caplog.text.lower()
