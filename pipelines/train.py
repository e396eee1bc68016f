"""Stage `train`: processed ids -> model dir + training reports, tracked in MLflow.

Params: seed, vectorize, model, train, tracking, evaluate.search (val/bleu decoding limits).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nmt.config import ConfigError, load_params
from nmt.training import NonFiniteLossError, TrackingError, train

log = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile", type=Path, default=None, help="params overrides file")
    parser.add_argument("--processed", type=Path, required=True)  # deps
    parser.add_argument("--model-dir", type=Path, required=True)  # outs
    parser.add_argument("--reports", type=Path, required=True)  # metrics, plots
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params, args.profile)
        result = train(params, args.processed, args.model_dir, args.reports,
                       repo_root=args.params.resolve().parent)
    except (ConfigError, NonFiniteLossError, TrackingError) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 1
    if result.run_id:
        log.info("run %s: best val/loss %.4f, val/bleu %.2f, %d steps in %.0f s",
                 result.run_id, result.best_val_loss, result.best_val_bleu, result.steps,
                 result.wall_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
