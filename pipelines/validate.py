"""Stage `validate`: raw archive -> data/interim/pairs.parquet + reports. Params: validate."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nmt.config import ConfigError, load_params
from nmt.data.download import DownloadError
from nmt.data.validate import validate_corpus

log = logging.getLogger("validate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile", type=Path, default=None, help="params overrides file")
    parser.add_argument("--archive", type=Path, required=True)  # deps
    parser.add_argument("--out", type=Path, required=True)  # outs
    parser.add_argument("--reports", type=Path, required=True)  # outs (reports)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params, args.profile)
        result = validate_corpus(args.archive, args.out, args.reports, params.download,
                                 params.validate)
    except (ConfigError, DownloadError) as exc:
        log.error("%s", exc)
        return 1
    if not result.ok:
        for problem in result.problems:
            log.error("%s", problem)
        log.error("validation failed; %s not written. Data Docs: %s", args.out,
                  args.reports / "docs" / "index.html")
        return 1
    log.info("%d pairs written to %s (%d lines rejected)", result.rows, args.out, result.rejected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
