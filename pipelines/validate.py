"""Stage `validate`: raw archive -> data/interim/pairs.parquet + reports. Params: validate."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nmt.config import Params
from nmt.data.download import DownloadError
from nmt.data.validate import validate_corpus
from nmt.stage import run_stage, stage_parser

log = logging.getLogger("validate")


def _run(args: argparse.Namespace, params: Params) -> int:
    result = validate_corpus(args.archive, args.out, args.reports, params.download,
                             params.validate)
    if not result.ok:
        for problem in result.problems:
            log.error("%s", problem)
        log.error("validation failed; %s not written. Data Docs: %s", args.out,
                  args.reports / "docs" / "index.html")
        return 1
    log.info("%d pairs written to %s (%d lines rejected)", result.rows, args.out, result.rejected)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--archive", type=Path, required=True)  # deps
    parser.add_argument("--out", type=Path, required=True)  # outs
    parser.add_argument("--reports", type=Path, required=True)  # outs (reports)
    return run_stage("validate", parser, argv, _run, expected=(DownloadError,))


if __name__ == "__main__":
    sys.exit(main())
