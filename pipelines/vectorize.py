"""Stage `vectorize`: pairs table -> grouped splits, tokenizers, ids. Params: seed, vectorize."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nmt.config import ConfigError, load_params
from nmt.data.vectorize import vectorize

log = logging.getLogger("vectorize")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile", type=Path, default=None, help="params overrides file")
    parser.add_argument("--pairs", type=Path, required=True)  # deps
    parser.add_argument("--out-dir", type=Path, required=True)  # outs
    parser.add_argument("--stats", type=Path, required=True)  # metrics
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params, args.profile)
    except ConfigError as exc:
        log.error("%s", exc)
        return 1
    stats = vectorize(args.pairs, args.out_dir, args.stats, params.vectorize, seed=params.seed)
    log.info("pairs train/valid/test: %s; vocab src/trg: %d/%d",
             "/".join(str(stats[s]["pairs"]) for s in ("train", "valid", "test")),
             stats["src_vocab_size"], stats["trg_vocab_size"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
