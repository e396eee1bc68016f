"""Stage `vectorize`: pairs table -> grouped splits, tokenizers, ids. Params: seed, vectorize."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nmt.config import Params
from nmt.data.vectorize import vectorize
from nmt.stage import run_stage, stage_parser

log = logging.getLogger("vectorize")


def _run(args: argparse.Namespace, params: Params) -> int:
    stats = vectorize(args.pairs, args.out_dir, args.stats, params.vectorize, seed=params.seed)
    log.info("pairs train/valid/test: %s; vocab src/trg: %d/%d",
             "/".join(str(stats[s]["pairs"]) for s in ("train", "valid", "test")),
             stats["src_vocab_size"], stats["trg_vocab_size"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--pairs", type=Path, required=True)  # deps
    parser.add_argument("--out-dir", type=Path, required=True)  # outs
    parser.add_argument("--stats", type=Path, required=True)  # outs (statistics)
    return run_stage("vectorize", parser, argv, _run)


if __name__ == "__main__":
    sys.exit(main())
