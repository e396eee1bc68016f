"""The `nmt` command: project utilities as subcommands.

    nmt params [--profile FILE]        check params.yaml (+ profile) and print the dotted keys
    nmt stats                          print the corpus/split statistics of the last vectorize run

Each subcommand is a plain function taking parsed arguments and returning an exit code, so tests
call them directly. Later stages register more subcommands in `build_parser`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from nmt.config import ConfigError, flatten, load_params

log = logging.getLogger("nmt")


def cmd_params(args: argparse.Namespace) -> int:
    """Validate the params file (and profile) and print every dotted key with its value."""
    try:
        params = load_params(args.params, args.profile)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for key, value in flatten(params):
        print(f"{key} = {value!r}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the vectorize statistics (split sizes, vocabulary, unknown-token rate)."""
    if not args.stats.is_file():
        print(f"error: {args.stats} not found; run `dvc repro vectorize` first", file=sys.stderr)
        return 1
    stats = json.loads(args.stats.read_text(encoding="utf-8"))
    print(f"tokenizer {stats['tokenizer']}: vocab src {stats['src_vocab_size']}, "
          f"trg {stats['trg_vocab_size']}")
    for split in ("train", "valid", "test"):
        s = stats[split]
        print(f"{split:>5}: {s['pairs']:>7} pairs, {s['sources']:>7} sources, "
              f"unk src {s['src_unk_rate']:.4%} trg {s['trg_unk_rate']:.4%}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="nmt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="check params.yaml and print the resolved values")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--profile", type=Path, default=None)
    p.set_defaults(func=cmd_params)
    p = sub.add_parser("stats", help="print the last vectorize statistics")
    p.add_argument("--stats", type=Path, default=Path("reports/vectorize/stats.json"))
    p.set_defaults(func=cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nmt` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
