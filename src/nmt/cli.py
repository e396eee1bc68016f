"""The `nmt` command: project utilities as subcommands.

    nmt params [--profile FILE]        check params.yaml (+ profile) and print the dotted keys
    nmt stats                          print the corpus/split statistics of the last vectorize run
    nmt translate [SENTENCE ...]       translate English (arguments, or lines on stdin)

Each subcommand is a plain function taking parsed arguments and returning an exit code, so tests
call them directly. Later stages register more subcommands in `build_parser`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from nmt.config import MAX_BEAM_SIZE, ConfigError, check_beam, flatten, load_params

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


def cmd_translate(args: argparse.Namespace) -> int:
    """Translate sentences given as arguments, or stdin lines (no arguments or `-`)."""
    from nmt.serving import ModelNotFoundError, open_translator  # torch/mlflow: import late
    from nmt.tracking import TrackingError, resolve_tracking_uri

    if args.beam is not None:  # before reading stdin or loading anything
        try:
            check_beam(args.beam, args.nbest or 1, beam_key="--beam", nbest_key="--nbest")
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    sentences = list(args.sentences)
    if not sentences or sentences == ["-"]:
        if sys.stdin is None or (not sentences and sys.stdin.isatty()):
            print("error: give sentences as arguments or pipe lines on stdin", file=sys.stderr)
            return 1
        sentences = [line.rstrip("\r\n") for line in sys.stdin]
    try:
        params = load_params(args.params)
        uri = resolve_tracking_uri(params.tracking, args.params.resolve().parent)
        model = args.model or f"models:/{params.export.registered_model}@champion"
        translate = open_translator(model, uri, int8=args.int8, full_vocab=args.full_vocab)
        results = translate(sentences, args.beam, args.nbest, args.batch_size)
    except (ConfigError, ModelNotFoundError, TrackingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for i, r in enumerate(results):
        if args.nbest in (None, 1):
            print(r.translation)
        else:
            print("\n".join(f"{i}\t{h.score:.4f}\t{h.translation}" for h in r.nbest))
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
    p = sub.add_parser("translate", help="translate English sentences (args or stdin lines)")
    p.add_argument("sentences", nargs="*", help="English sentences; none or '-': read stdin")
    p.add_argument("--model", default=None, help="model folder, runs:/..., models:/NAME@ALIAS "
                   "(default: models:/<export.registered_model>@champion)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--beam", type=int, default=None, help=f"beam size in [1, {MAX_BEAM_SIZE}], "
                   "1 = greedy (default: evaluate.search.beam_size)")
    p.add_argument("--nbest", type=int, default=None, help="hypotheses per sentence, printed as "
                   "INDEX<TAB>SCORE<TAB>TEXT when > 1")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--int8", action="store_true", help="decode with an int8 copy of the model "
                   "(CPU only; faster, outputs may differ slightly from fp32)")
    p.add_argument("--full-vocab", action="store_true", help="search the whole target "
                   "vocabulary instead of the model's lexical shortlist (slower)")
    p.set_defaults(func=cmd_translate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nmt` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
