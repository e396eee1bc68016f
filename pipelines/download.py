"""Stage `download`: fetch the Anki fra-eng archive (bundled copy or URL), verified.

Params: download. Writes the archive to `--out` and its observed sha256 to `<out>.sha256`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nmt.config import Params
from nmt.data.download import DownloadError, fetch_corpus
from nmt.stage import run_stage, stage_parser

REPO_ROOT = Path(__file__).resolve().parents[1]  # `download.bundled` is relative to this
log = logging.getLogger("download")


def _run(args: argparse.Namespace, params: Params) -> int:
    result = fetch_corpus(params.download, args.out, REPO_ROOT)
    log.info("%s: %d bytes from %s, sha256 %s", result.path, result.bytes, result.source,
             result.sha256)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True)  # outs
    return run_stage("download", parser, argv, _run, expected=(DownloadError,))


if __name__ == "__main__":
    sys.exit(main())
