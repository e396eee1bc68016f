"""The Great Expectations suite passes on good pairs and names what fails on broken ones."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from conftest import tiny_raw
from nmt.config import parse_params
from nmt.data.validation import run_suite


def _cfg(**changes):
    return dataclasses.replace(parse_params(tiny_raw()).validate, **changes)


def _pairs(n: int = 50) -> pd.DataFrame:
    return pd.DataFrame({"en": [f"Sentence number {i}." for i in range(n)],
                         "fr": [f"Phrase numéro {i}." for i in range(n)]})


def test_good_pairs_pass_and_docs_are_written(tmp_path: Path) -> None:
    summary = run_suite(_pairs(), _cfg(min_rows=10), tmp_path / "docs")
    assert summary.success, summary.failures
    assert len(summary.outcomes) == 9
    index = (tmp_path / "docs" / "index.html").read_text(encoding="utf-8")
    assert "fra_eng_pairs" in index
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".docs-")]


def test_broken_pairs_fail_with_named_expectations(tmp_path: Path) -> None:
    pairs = _pairs()
    pairs.loc[0, "fr"] = "x" * 500                                   # too long and bad ratio
    pairs.loc[2, "fr"] = "Prix : 5 ¤¤¤ ☃"                             # disallowed symbols
    pairs = pd.concat([pairs, pairs.iloc[3:13]], ignore_index=True)  # duplicates
    summary = run_suite(pairs, _cfg(min_rows=100, allowed_chars_mostly=1.0,
                                    length_ratio_mostly=1.0), tmp_path / "docs")
    assert not summary.success
    failed = {(o.name, o.column) for o in summary.failures}
    assert failed == {
        ("expect_table_row_count_to_be_between", None),
        ("expect_column_value_lengths_to_be_between", "fr"),
        ("expect_column_values_to_match_regex", "fr"),
        ("expect_column_values_to_be_between", "length_ratio"),
        ("expect_column_proportion_of_unique_values_to_be_between", "pair"),
    }
    words = {o.description for o in summary.failures}
    assert any("duplicates" in w for w in words)
    assert summary.to_dict()["failed"] == 5
