"""The `nmt` console script's utility subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from conftest import REPO, TINY_PROFILE
from nmt.cli import build_parser, find_project, main


def test_params_prints_dotted_keys(capsys) -> None:
    assert main(["params", "--params", str(REPO / "params.yaml"),
                 "--profile", str(TINY_PROFILE)]) == 0
    out = capsys.readouterr().out
    assert "model.hidden = 16" in out and "evaluate.search.beam_size = 2" in out


def test_params_error_names_key(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text((REPO / "params.yaml").read_text().replace("seed: 1234", "seed: abc"))
    assert main(["params", "--params", str(bad)]) == 1
    assert "seed: expected int" in capsys.readouterr().err


def test_stats(tiny_data: dict[str, Path], capsys) -> None:
    assert main(["stats", "--stats", str(tiny_data["reports"] / "vectorize/stats.json")]) == 0
    assert "train:" in capsys.readouterr().out
    assert main(["stats", "--stats", str(tiny_data["reports"] / "missing.json")]) == 1


def test_version(capsys) -> None:
    from nmt import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"nmt {__version__}"


def test_help_shows_examples_and_every_option_has_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and 'nmt translate "Be nice."' in out and "nmt serve" in out
    assert "Later stages" not in out and "tests call them" not in out  # no notes to developers
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"nmt {name} {action.option_strings or action.dest}: no help"


def test_params_found_from_a_subfolder_of_the_project(capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO / "src" / "nmt")
    assert find_project(Path.cwd()) == REPO
    assert main(["params"]) == 0
    assert "seed = " in capsys.readouterr().out


def test_outside_a_project_says_what_to_pass(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert find_project(tmp_path) is None
    assert main(["params"]) == 1
    assert "pass --params" in capsys.readouterr().err
    assert main(["translate", "Go."]) == 1
    err = capsys.readouterr().err
    assert "pass --model" in err and "MLFLOW_TRACKING_URI" in err and "Traceback" not in err
    assert main(["translate", "--model", "runs:/abc/translator", "Go."]) == 1
    assert "set MLFLOW_TRACKING_URI" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_serve_threads")
def test_serve_a_missing_model_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    assert main(["serve", "--model", str(tmp_path / "nothing"), "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load") and "dvc repro export" in err
    assert "Traceback" not in err


@pytest.mark.usefixtures("restore_serve_threads")
def test_serve_refuses_a_bad_thread_count_before_loading(tmp_path: Path, capsys) -> None:
    assert main(["serve", "--model", str(tmp_path / "nothing"), "--threads", "0"]) == 1
    err = capsys.readouterr().err
    assert err == "error: threads: must be a whole number >= 1, got '0' (--threads or " \
                  "OMP_NUM_THREADS)\n"


def test_translate_rejects_a_beam_outside_the_range_before_loading(tmp_path: Path,
                                                                   capsys) -> None:
    missing = tmp_path / "no-model"  # nothing is loaded: the flag is checked first
    for flags, message in ((["--beam", "100"], "--beam: must be in [1, 64], got 100"),
                           (["--beam", "0"], "--beam: must be in [1, 64], got 0"),
                           (["--beam", "3", "--nbest", "4"],
                            "--nbest: must be in [1, beam_size=3], got 4")):
        assert main(["translate", "--model", str(missing), *flags, "Hi."]) == 1
        err = capsys.readouterr().err
        assert err.strip() == f"error: {message}"
