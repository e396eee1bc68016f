"""Stage `evaluate`: model dir + test split -> BLEU/chrF/TER, reports, logged to the train run.

Params: seed, evaluate (search settings, sample size, heatmaps, length buckets).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from nmt.checkpoint import ModelFileError
from nmt.config import Params
from nmt.evaluation import TUTORIAL_EXAMPLES, evaluate
from nmt.shortlist import ShortlistError
from nmt.stage import run_stage, stage_parser
from nmt.tracking import TrackingError
from nmt.translator import InputError, read_lines

log = logging.getLogger("evaluate")


def _run(args: argparse.Namespace, params: Params) -> int:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    examples = read_lines(args.examples) if args.examples else list(TUTORIAL_EXAMPLES)
    metrics = evaluate(params.evaluate, params.seed, args.model_dir, args.processed,
                       args.reports, examples=examples, device=device)
    log.info("test/bleu %.2f, test/chrf %.2f -> %s", metrics["test/bleu"], metrics["test/chrf"],
             args.reports)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)  # deps
    parser.add_argument("--processed", type=Path, required=True)  # deps
    parser.add_argument("--reports", type=Path, required=True)  # outs, metrics
    parser.add_argument("--examples", type=Path, default=None,
                        help="UTF-8 file of extra English sentences for samples.md, one per line "
                             "(default: the tutorial's examples)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda if any)")
    return run_stage("evaluate", parser, argv, _run,
                     expected=(InputError, TrackingError, ModelFileError, ShortlistError))


if __name__ == "__main__":
    sys.exit(main())
