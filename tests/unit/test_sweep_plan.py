"""bench/sweep.py checks the whole sweep against params.yaml before any run spends its minutes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO


def _sweep(tmp_path: Path, runs: dict, *args: str) -> subprocess.CompletedProcess:
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"common": {"train": {"max_steps": 3}}, "runs": runs}))
    return subprocess.run([sys.executable, str(REPO / "bench/sweep.py"), str(spec), "--out",
                           str(tmp_path / "out"), *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_a_misspelt_key_stops_before_any_run(tmp_path: Path) -> None:
    done = _sweep(tmp_path, {"first": {"model": {"arch": "transformer"}},
                             "second": {"train": {"lrr": 0.1}}})
    assert done.returncode == 1
    assert "sweep run 'second': train.lrr: unknown key" in done.stderr
    assert not (tmp_path / "out").exists()  # the valid first run did not start either


def test_a_bad_value_names_run_and_key(tmp_path: Path) -> None:
    done = _sweep(tmp_path, {"t": {"model": {"arch": "lstm"}}})
    assert done.returncode == 1
    assert "sweep run 't': model.arch" in done.stderr


def test_an_unknown_only_name_is_refused(tmp_path: Path) -> None:
    done = _sweep(tmp_path, {"first": {"train": {"lr": 0.002}}}, "--only", "frist")
    assert done.returncode == 1
    assert "no run named frist" in done.stderr and "it has: first" in done.stderr
    assert not (tmp_path / "out").exists()


def test_plan_merges_common_then_own_and_keeps_what_differs() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import sweep
    finally:
        sys.path.remove(str(REPO / "bench"))
    spec = {"common": {"train": {"max_steps": 300, "lr": 0.0123}},
            "runs": {"a": {"train": {"lr": 0.0456}}, "b": None}}
    planned = sweep.plan(spec, None)
    assert planned["a"]["train"] == {"max_steps": 300, "lr": 0.0456}
    assert planned["b"] == {"train": {"max_steps": 300, "lr": 0.0123}}
    assert list(sweep.plan(spec, ["b"])) == ["b"]


def test_a_missing_or_empty_sweep_file_is_one_line(tmp_path: Path) -> None:
    missing = subprocess.run([sys.executable, str(REPO / "bench/sweep.py"),
                              str(tmp_path / "nope.yaml")], capture_output=True, text=True,
                             timeout=120, check=False)
    assert missing.returncode == 1 and "nope.yaml: not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    done = _sweep(tmp_path, {})
    assert done.returncode == 1 and "no `runs:` mapping" in done.stderr
