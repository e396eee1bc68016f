"""Great Expectations suite on the pairs table: build, run, summarise, render Data Docs.

The only module that imports Great Expectations. The suite runs on an in-memory pandas frame
through an ephemeral context; Data Docs are written to a folder given by the caller, so a person
opens `<docs_dir>/index.html` and sees every expectation with its observed result.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from nmt.config import ValidateConfig

log = logging.getLogger(__name__)

# Letters (any script, so accents and ligatures pass), digits, spaces and common punctuation.
ALLOWED_CHARS = r"^[\w\s.,;:!?'\"«»‘’“”()\[\]\-–—%€$£&/…+*=#@°]+$"

SUITE_NAME = "fra_eng_pairs"


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's result in plain words."""

    name: str
    column: str | None
    success: bool
    description: str
    observed: dict[str, Any]


@dataclass(frozen=True)
class ValidationSummary:
    """What the suite found; `failures` names the expectations that did not pass."""

    success: bool
    outcomes: list[ExpectationOutcome]

    @property
    def failures(self) -> list[ExpectationOutcome]:
        """Expectations that failed."""
        return [o for o in self.outcomes if not o.success]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (the DVC metric file)."""
        return {
            "success": self.success,
            "evaluated": len(self.outcomes),
            "failed": len(self.failures),
            "expectations": [
                {"name": o.name, "column": o.column, "success": o.success,
                 "description": o.description, "observed": o.observed}
                for o in self.outcomes
            ],
        }


def add_derived_columns(pairs: pd.DataFrame) -> pd.DataFrame:
    """Columns the suite checks: side lengths, length ratio and the pair-duplicate flag."""
    frame = pairs[["en", "fr"]].copy()
    frame["en_chars"] = frame["en"].str.len().astype("int64")
    frame["fr_chars"] = frame["fr"].str.len().astype("int64")
    frame["length_ratio"] = frame["fr_chars"] / frame["en_chars"].clip(lower=1)
    frame["pair"] = frame["en"] + "\t" + frame["fr"]
    return frame


def _expectations(cfg: ValidateConfig, gx: Any) -> list[tuple[Any, str]]:
    """The suite, each expectation with the sentence a person reads when it fails."""
    e = gx.expectations
    items: list[tuple[Any, str]] = [
        (e.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows, max_value=cfg.max_rows),
         f"the table has between {cfg.min_rows} and {cfg.max_rows} pairs"),
    ]
    for side in ("en", "fr"):
        items += [
            (e.ExpectColumnValuesToNotBeNull(column=side), f"no {side} sentence is missing"),
            (e.ExpectColumnValueLengthsToBeBetween(column=side, min_value=1,
                                                   max_value=cfg.max_chars),
             f"every {side} sentence has 1 to {cfg.max_chars} characters"),
            (e.ExpectColumnValuesToMatchRegex(column=side, regex=ALLOWED_CHARS,
                                              mostly=cfg.allowed_chars_mostly),
             f"at least {cfg.allowed_chars_mostly:.1%} of {side} sentences use only letters, "
             "digits, spaces and common punctuation"),
        ]
    items += [
        (e.ExpectColumnValuesToBeBetween(column="length_ratio", min_value=cfg.min_length_ratio,
                                         max_value=cfg.max_length_ratio,
                                         mostly=cfg.length_ratio_mostly),
         f"at least {cfg.length_ratio_mostly:.1%} of pairs have a French/English length ratio "
         f"between {cfg.min_length_ratio} and {cfg.max_length_ratio}"),
        (e.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column="pair", min_value=1.0 - cfg.max_duplicate_share, max_value=1.0),
         f"at most {cfg.max_duplicate_share:.1%} of (en, fr) pairs are exact duplicates"),
    ]
    return items


def _observed(result: Any) -> dict[str, Any]:
    keep = ("observed_value", "element_count", "unexpected_count", "unexpected_percent",
            "partial_unexpected_list")
    raw = dict(result.result or {})
    out = {k: raw[k] for k in keep if k in raw}
    if "partial_unexpected_list" in out:
        out["partial_unexpected_list"] = [str(v)[:80] for v in out["partial_unexpected_list"][:5]]
    return out


def run_suite(pairs: pd.DataFrame, cfg: ValidateConfig, docs_dir: Path) -> ValidationSummary:
    """Run the suite on `pairs` (columns en, fr) and render Data Docs into `docs_dir`.

    Data Docs are built in a temporary folder and moved into place, so `docs_dir` never holds a
    half-written site.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    docs_dir = Path(docs_dir).resolve()
    docs_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".docs-", dir=docs_dir.parent))
    try:
        context.add_data_docs_site(site_name="reports", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(staging)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        batch_def = (context.data_sources.add_pandas("pairs")
                     .add_dataframe_asset(name="pairs")
                     .add_batch_definition_whole_dataframe("all"))
        suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
        descriptions = {}
        for expectation, text in _expectations(cfg, gx):
            suite.add_expectation(expectation)
            descriptions[expectation.id] = text
        vdef = context.validation_definitions.add(
            gx.ValidationDefinition(name="pairs", data=batch_def, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name="validate", validation_definitions=[vdef],
            actions=[UpdateDataDocsAction(name="docs", site_names=["reports"])]))
        result = checkpoint.run(batch_parameters={"dataframe": add_derived_columns(pairs)})
        (run_result,) = result.run_results.values()
        outcomes = [
            ExpectationOutcome(
                name=r.expectation_config.type, column=r.expectation_config.kwargs.get("column"),
                success=bool(r.success), description=descriptions[r.expectation_config.id],
                observed=_observed(r))
            for r in run_result.results
        ]
        if docs_dir.exists():
            shutil.rmtree(docs_dir)
        staging.rename(docs_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ValidationSummary(success=all(o.success for o in outcomes), outcomes=outcomes)
