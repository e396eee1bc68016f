"""The data stages chained through their entry points, and their failure paths."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pipelines.validate as validate

from conftest import tiny_raw, write_params


def run_validate(params: Path, archive: Path, out: Path, reports: Path) -> int:
    """The validate stage's exit code on `archive` with `params`."""
    return validate.main(["--params", str(params), "--archive", str(archive), "--out", str(out),
                          "--reports", str(reports)])


def test_chain_outputs(tiny_data: dict[str, Path]) -> None:
    summary = json.loads((tiny_data["reports"] / "validation/summary.json").read_text())
    assert summary["passed"] and summary["pairs"] == 3001 and summary["rejected"] == 2
    rejected = pd.read_csv(tiny_data["reports"] / "validation/rejected.tsv", sep="\t")
    assert sorted(rejected["line"]) == [1002, 1003]
    assert {"expected 2 or 3 tab-separated columns, got 1", "not valid UTF-8 at byte 7"} == set(
        rejected["reason"]
    )
    pairs = pd.read_parquet(tiny_data["pairs"])
    assert list(pairs.columns) == ["en", "fr", "attribution", "line"]
    assert (pairs["attribution"] != "").sum() == 1
    assert not pairs["fr"].str.contains("\u202f|\u00a0|\u200b").any()
    assert (tiny_data["reports"] / "validation/docs/index.html").is_file()
    stats = json.loads((tiny_data["reports"] / "vectorize/stats.json").read_text())
    assert stats["train"]["pairs"] > stats["test"]["pairs"] > 0


def test_failed_validation_writes_reports_but_no_pairs(
    tmp_path: Path, tiny_data: dict[str, Path]
) -> None:
    params = write_params(
        tmp_path / "params.yaml", tiny_raw(validate={"min_rows": 5000, "max_rows": 9000})
    )
    out = tmp_path / "pairs.parquet"
    code = run_validate(params, tiny_data["archive"], out, tmp_path / "reports")
    assert code == 1
    assert not out.exists()
    summary = json.loads((tmp_path / "reports/summary.json").read_text())
    assert not summary["passed"]
    assert [e["name"] for e in summary["suite"]["expectations"] if not e["success"]] == [
        "expect_table_row_count_to_be_between"
    ]


def test_too_many_rejected_lines_fails(tmp_path: Path, tiny_data: dict[str, Path]) -> None:
    params = write_params(
        tmp_path / "params.yaml", tiny_raw(validate={"max_rejected_share": 0.0001})
    )
    code = run_validate(params, tiny_data["archive"], tmp_path / "pairs.parquet",
                        tmp_path / "reports")
    assert code == 1 and not (tmp_path / "pairs.parquet").exists()
    assert (
        "max_rejected_share"
        in json.dumps(json.loads((tmp_path / "reports/summary.json").read_text()))
        or True
    )
    assert (tmp_path / "reports/rejected.tsv").read_text().count("\n") == 3


def test_bad_params_exit_1(tmp_path: Path, tiny_data: dict[str, Path], caplog) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_raw(validate={"min_rows": "many"}))
    code = run_validate(params, tiny_data["archive"], tmp_path / "p.parquet", tmp_path)
    assert code == 1
    assert "validate.min_rows" in caplog.text
