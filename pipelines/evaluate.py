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
from nmt.config import ConfigError, load_params
from nmt.evaluation import TUTORIAL_EXAMPLES, evaluate
from nmt.shortlist import ShortlistError
from nmt.tracking import TrackingError
from nmt.translator import InputError, read_lines

log = logging.getLogger("evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile", type=Path, default=None, help="params overrides file")
    parser.add_argument("--model-dir", type=Path, default=Path("models"))  # deps
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))  # deps
    parser.add_argument("--reports", type=Path, default=Path("reports/evaluate"))  # outs
    parser.add_argument("--examples", type=Path, default=None,
                        help="UTF-8 file of extra English sentences for samples.md, one per line "
                             "(default: the tutorial's examples)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda if any)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    try:
        params = load_params(args.params, args.profile)
        examples = read_lines(args.examples) if args.examples else list(TUTORIAL_EXAMPLES)
        metrics = evaluate(params.evaluate, params.seed, args.model_dir, args.processed,
                           args.reports, examples=examples, device=device)
    except (ConfigError, InputError, FileNotFoundError, TrackingError, ModelFileError,
            ShortlistError) as exc:
        log.error("%s", exc)
        return 1
    log.info("test/bleu %.2f, test/chrf %.2f -> %s", metrics["test/bleu"], metrics["test/chrf"],
             args.reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
