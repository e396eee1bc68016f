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

from nmt.checkpoint import RUN_FILE, ModelFileError
from nmt.config import ConfigError, load_params
from nmt.export import ExportError, export
from nmt.registry import RegistryError
from nmt.shortlist import ShortlistError
from nmt.tracking import TrackingError, check_reachable, read_run_json

log = logging.getLogger("export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile", type=Path, default=None, help="params overrides file")
    parser.add_argument("--model-dir", type=Path, default=Path("models"))  # deps
    parser.add_argument("--eval-metrics", type=Path,
                        default=Path("reports/evaluate/metrics.json"))  # deps
    parser.add_argument("--test-data", type=Path,
                        default=Path("data/processed/test.parquet"))  # deps (parity sentences)
    parser.add_argument("--attribution", type=Path,
                        default=Path("data/external/ATTRIBUTION.md"))  # deps
    parser.add_argument("--out-dir", type=Path, default=Path("models/export"))  # outs
    parser.add_argument("--reports", type=Path, default=Path("reports/export"))  # metrics
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params, args.profile)
        run_json = args.model_dir / RUN_FILE
        if run_json.is_file():  # a broken store fails here, naming its file, not in sqlalchemy
            check_reachable(read_run_json(run_json).tracking_uri)
        result = export(params, args.model_dir, args.eval_metrics, args.test_data, args.out_dir,
                        args.reports, args.attribution)
    except (ConfigError, ExportError, RegistryError, TrackingError, FileNotFoundError,
            ModelFileError, ShortlistError) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 1
    p = result.promotion
    log.info("parity ok on %d test sentences (greedy, beam %d); %s version %s %s: %s",
             result.parity.sentences, result.parity.beam_size, p.registered_model, p.version,
             p.decision, p.reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
