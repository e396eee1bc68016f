"""Stage `check_params`: every params section checked before any other stage runs.

Params: the whole params.yaml. DVC deletes a stage's outputs before it runs the stage's command,
so a mistake found by the stage itself would cost the previous outputs. Every stage depends on
this stage's output, whose content never changes: it reruns (in a second) whenever params.yaml
changes, stops `dvc repro` with one line when a value is wrong, and when they are all valid it
leaves the downstream stages to decide on their own params and deps.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nmt.config import Params
from nmt.io import write_text
from nmt.stage import run_stage, stage_parser

log = logging.getLogger("check_params")
CONTENT = "params valid: every section of the params file passed nmt.config's checks\n"


def _run(args: argparse.Namespace, params: Params) -> int:
    write_text(args.out, CONTENT)  # the same bytes every time: downstream stages stay up to date
    log.info("%s: every params section is valid", args.params)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True)  # outs
    return run_stage("check_params", parser, argv, _run)


if __name__ == "__main__":
    sys.exit(main())
