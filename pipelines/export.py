"""Stage `export`: model dir + test BLEU -> portable export, registered MLflow model, promotion.

Params: export, evaluate.search, tracking. Registers a new version of `export.registered_model`
(aliases `candidate`, and `champion` when the promotion gate passes); see `nmt.export.stage`
and `nmt.registry`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nmt.checkpoint import ModelDir, ModelFileError
from nmt.config import Params
from nmt.export import ExportError, export
from nmt.registry import RegistryError
from nmt.shortlist import ShortlistError
from nmt.stage import run_stage, stage_parser
from nmt.tracking import TrackingError, check_reachable, read_run_json

log = logging.getLogger("export")


def _run(args: argparse.Namespace, params: Params) -> int:
    folder = ModelDir(args.model_dir)
    if folder.has_run():  # a broken store fails here, naming its file, not in sqlalchemy
        check_reachable(read_run_json(folder.run_file).tracking_uri)
    result = export(params, args.model_dir, args.eval_metrics, args.test_data, args.out_dir,
                    args.reports, args.attribution)
    p = result.promotion
    log.info("parity ok on %d test sentences (greedy, beam %d); %s version %s %s: %s",
             result.parity.sentences, result.parity.beam_size, p.registered_model, p.version,
             p.decision, p.reason)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)  # deps
    parser.add_argument("--eval-metrics", type=Path, required=True)  # deps
    parser.add_argument("--test-data", type=Path, required=True)  # deps (parity sentences)
    parser.add_argument("--attribution", type=Path, required=True)  # deps
    parser.add_argument("--out-dir", type=Path, required=True)  # outs
    parser.add_argument("--reports", type=Path, required=True)  # outs (promotion, parity)
    return run_stage("export", parser, argv, _run,
                     expected=(ExportError, RegistryError, TrackingError, ModelFileError,
                               ShortlistError))


if __name__ == "__main__":
    sys.exit(main())
