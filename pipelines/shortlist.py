"""Stage `shortlist`: training pairs -> lexical shortlist for search. Params: shortlist."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nmt.config import Params
from nmt.shortlist import write_shortlist
from nmt.stage import run_stage, stage_parser

log = logging.getLogger("shortlist")


def _run(args: argparse.Namespace, params: Params) -> int:
    cfg = params.shortlist
    shortlist = write_shortlist(args.processed, args.out, cfg.top_k, cfg.frequent)
    if not shortlist.enabled:
        log.info("shortlist.top_k = 0: %s disables the shortlist (full vocabulary)", args.out)
        return 0
    log.info("%s: up to %d target pieces per source piece (%d lists, %d entries) + %d always",
             args.out, cfg.top_k, shortlist.src_vocab_size, len(shortlist.targets),
             len(shortlist.always))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--processed", type=Path, required=True)  # deps
    parser.add_argument("--out", type=Path, required=True)  # outs
    return run_stage("shortlist", parser, argv, _run)


if __name__ == "__main__":
    sys.exit(main())
