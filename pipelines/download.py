"""Stage `download`: fetch the Anki fra-eng archive (bundled copy or URL), verified.

Params: download. Writes the archive to `--out` and its observed sha256 to `<out>.sha256`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nmt.config import load_params
from nmt.data.download import DownloadError, fetch_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]  # `download.bundled` is relative to this


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile", type=Path, default=None, help="YAML overrides (optional)")
    parser.add_argument("--out", type=Path, required=True)  # outs: data/raw/fra-eng.zip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("download")
    params = load_params(args.params, args.profile)
    try:
        result = fetch_corpus(params.download, args.out, REPO_ROOT)
    except DownloadError as exc:
        log.error("download failed: %s", exc)
        return 1
    log.info(
        "%s: %d bytes from %s, sha256 %s", result.path, result.bytes, result.source, result.sha256
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
