"""Stage `shortlist`: training pairs -> lexical shortlist for search. Params: shortlist."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nmt.config import ConfigError, load_params
from nmt.shortlist import write_shortlist

log = logging.getLogger("shortlist")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile", type=Path, default=None, help="params overrides file")
    parser.add_argument("--processed", type=Path, required=True)  # deps
    parser.add_argument("--out", type=Path, required=True)  # outs
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params, args.profile)
    except ConfigError as exc:
        log.error("%s", exc)
        return 1
    cfg = params.shortlist
    shortlist = write_shortlist(args.processed, args.out, cfg.top_k, cfg.frequent)
    if not shortlist.enabled:
        log.info("shortlist.top_k = 0: %s disables the shortlist (full vocabulary)", args.out)
        return 0
    log.info("%s: up to %d target pieces per source piece (%d lists, %d entries) + %d always",
             args.out, cfg.top_k, shortlist.src_vocab_size, len(shortlist.targets),
             len(shortlist.always))
    return 0


if __name__ == "__main__":
    sys.exit(main())
