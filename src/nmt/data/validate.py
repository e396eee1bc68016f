"""The validate stage: raw archive -> checked, normalised pairs table plus reports.

Reads `fra.txt` from the archive, rejects malformed lines (with line number and reason), runs the
Great Expectations suite, and writes `pairs.parquet` only when every check passes.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from nmt.config import DownloadConfig, ValidateConfig
from nmt.data.corpus import parse_corpus
from nmt.data.download import read_corpus_member
from nmt.data.validation import run_suite
from nmt.io import atomic_path, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidateResult:
    """Outcome of the validate stage; `problems` is empty when it passed."""

    rows: int
    rejected: int
    rejected_share: float
    problems: list[str]

    @property
    def ok(self) -> bool:
        """True when the pairs table was written."""
        return not self.problems


def validate_corpus(archive: Path, out: Path, reports_dir: Path, download_cfg: DownloadConfig,
                    cfg: ValidateConfig) -> ValidateResult:
    """Validate the corpus in `archive`; write `out` (parquet) only if it passes.

    Always writes `reports_dir/rejected.tsv`, `reports_dir/summary.json` (DVC metric) and the Data
    Docs site `reports_dir/docs/`, so a failed run can be inspected.
    """
    parsed = parse_corpus(read_corpus_member(archive, download_cfg))
    log.info("parsed %d lines: %d pairs, %d rejected", parsed.total_lines, len(parsed.pairs),
             len(parsed.rejected))
    with atomic_path(reports_dir / "rejected.tsv") as tmp:
        parsed.rejected.to_csv(tmp, sep="\t", index=False, quoting=csv.QUOTE_MINIMAL)
    problems = []
    if parsed.rejected_share > cfg.max_rejected_share:
        reasons = parsed.rejected["reason"].value_counts().head(3).to_dict()
        problems.append(
            f"{len(parsed.rejected)} of {parsed.total_lines} lines rejected "
            f"({parsed.rejected_share:.3%} > validate.max_rejected_share "
            f"{cfg.max_rejected_share:.3%}); most common reasons: {reasons}; "
            f"see {reports_dir / 'rejected.tsv'}")
    summary = run_suite(parsed.pairs, cfg, reports_dir / "docs")
    problems += [f"expectation failed: {o.description} ({o.name}"
                 + (f" on column {o.column}" if o.column else "") + f"; observed {o.observed})"
                 for o in summary.failures]
    write_json(reports_dir / "summary.json", {
        "lines": parsed.total_lines, "pairs": len(parsed.pairs),
        "rejected": len(parsed.rejected), "rejected_share": parsed.rejected_share,
        "reject_reasons": parsed.rejected["reason"].value_counts().to_dict(),
        "suite": summary.to_dict(), "passed": not problems,
    })
    if not problems:
        with atomic_path(out, suffix=".parquet") as tmp:
            parsed.pairs.to_parquet(tmp, index=False)
    return ValidateResult(rows=len(parsed.pairs), rejected=len(parsed.rejected),
                          rejected_share=parsed.rejected_share, problems=problems)
