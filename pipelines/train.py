"""Stage `train`: processed ids -> model dir + training reports, tracked in MLflow.

Params: seed, vectorize, model, train, tracking, evaluate.search (val/bleu decoding limits).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nmt.config import Params
from nmt.stage import run_stage, stage_parser
from nmt.training import NonFiniteLossError, TrackingError, train

log = logging.getLogger("train")


def _run(args: argparse.Namespace, params: Params) -> int:
    result = train(params, args.processed, args.model_dir, args.reports,
                   repo_root=args.params.resolve().parent)
    if result.run_id:
        log.info("run %s: best val/loss %.4f, val/bleu %.2f, %d steps in %.0f s",
                 result.run_id, result.best_val_loss, result.best_val_bleu, result.steps,
                 result.wall_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--processed", type=Path, required=True)  # deps
    parser.add_argument("--model-dir", type=Path, required=True)  # outs
    parser.add_argument("--reports", type=Path, required=True)  # outs, metrics, plots
    return run_stage("train", parser, argv, _run, expected=(NonFiniteLossError, TrackingError))


if __name__ == "__main__":
    sys.exit(main())
