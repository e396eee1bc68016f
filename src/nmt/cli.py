"""The `nmt` command: translate, serve, and check the project's params and data.

Each subcommand is a plain function taking parsed arguments and returning an exit code, so tests
call them directly. `EXAMPLES` is what `nmt --help` shows users.

Size: about 300 lines, one function per subcommand plus the argument tree they share.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from nmt import __version__
from nmt.config import (
    DECODE_PRECISIONS,
    MAX_BEAM_SIZE,
    ConfigError,
    check_beam,
    flatten,
    load_params,
)
from nmt.text import unicode_problem

log = logging.getLogger("nmt")

DESCRIPTION = "English->French translation with the project's attention seq2seq model."
EXAMPLES = """\
examples:
  nmt translate "Be nice." "Get out!"         translate arguments, one output line each
  nmt translate < english.txt > french.txt    translate stdin line by line (any length, in order)
  nmt translate --model models "Go."          use a local model folder (no tracking store needed)
  nmt translate --beam 5 --nbest 3 "Go."      3 best translations: LINE<TAB>SCORE<TAB>TEXT
  nmt serve --model models:/fra-eng-translator@champion --port 5001
                                              REST API: POST /invocations {"inputs": ["Go."]}
  nmt params --profile tests/fixtures/params_tiny.yaml
  nmt stats

Inside the project (any folder under the one holding params.yaml and dvc.yaml) the default model
is the registered champion and the tracking store comes from params.yaml. Elsewhere, pass
--model (a folder, or a URI with MLFLOW_TRACKING_URI set) or set MLFLOW_TRACKING_URI.

Input lines that are not valid UTF-8 (or longer than 1000 characters) are reported on stderr
with their line number and left out (an empty output line keeps the others aligned); every
other line is translated, and the exit code is then 1.
"""
PROJECT_FILES = ("params.yaml", "dvc.yaml")
DEFAULT_MODEL = "models:/fra-eng-translator@champion"  # outside a project (params.yaml names it)
CHUNK_LINES = 256  # lines read, translated and written at a time (the serving request limit)


class UsageError(ValueError):
    """The command line does not say enough to run (no model, no store); the message says how."""


def find_project(start: Path) -> Path | None:
    """The nearest folder at or above `start` holding params.yaml and dvc.yaml, else None."""
    for folder in (start.resolve(), *start.resolve().parents):
        if all((folder / name).is_file() for name in PROJECT_FILES):
            return folder
    return None


def _params_path(given: Path | None) -> Path | None:
    """`--params` as given, else the project's params.yaml, else None (outside a project)."""
    if given is not None:
        return given
    root = find_project(Path.cwd())
    return root / "params.yaml" if root else None


def cmd_params(args: argparse.Namespace) -> int:
    """Validate the params file (and profile) and print every dotted key with its value."""
    try:
        path = _params_path(args.params)
        if path is None:
            raise UsageError(f"no params.yaml (nmt project) in {Path.cwd()} or above; pass "
                             "--params FILE or run inside the project")
        params = load_params(path, args.profile)
    except (ConfigError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for key, value in flatten(params):
        print(f"{key} = {value!r}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the vectorize statistics (split sizes, vocabulary, unknown-token rate)."""
    path = args.stats
    if path is None:
        root = find_project(Path.cwd()) or Path.cwd()
        path = root / "reports/vectorize/stats.json"
    if not path.is_file():
        print(f"error: {path} not found; run `dvc repro vectorize` first", file=sys.stderr)
        return 1
    stats = json.loads(path.read_text(encoding="utf-8"))
    print(f"tokenizer {stats['tokenizer']}: vocab src {stats['src_vocab_size']}, "
          f"trg {stats['trg_vocab_size']}")
    for split in ("train", "valid", "test"):
        s = stats[split]
        print(f"{split:>5}: {s['pairs']:>7} pairs, {s['sources']:>7} sources, "
              f"unk src {s['src_unk_rate']:.4%} trg {s['trg_unk_rate']:.4%}")
    return 0


def resolve_model(model: str | None, params: Path | None) -> tuple[str, str]:
    """(model reference, tracking URI) from --model, --params / the project, and the env.

    Raises:
        ConfigError: the params file is missing or invalid.
        UsageError: nothing says which model to use, or a URI needs a store nobody named.
    """
    from nmt.model_ref import is_model_uri
    from nmt.tracking import ENV_URI, resolve_tracking_uri

    path = _params_path(params)
    if path is not None:
        loaded = load_params(path)
        uri = resolve_tracking_uri(loaded.tracking, path.resolve().parent)
        return model or f"models:/{loaded.export.registered_model}@champion", uri
    uri = os.environ.get(ENV_URI, "")
    if model is None and not uri:
        raise UsageError(f"no model given and no nmt project (params.yaml + dvc.yaml) in "
                         f"{Path.cwd()} or above: pass --model FOLDER, or set {ENV_URI} to use "
                         f"{DEFAULT_MODEL}")
    model = model or DEFAULT_MODEL
    if is_model_uri(model) and not uri:
        raise UsageError(f"--model {model} is looked up in a tracking store: set {ENV_URI}, or "
                         "run inside the project")
    return model, uri


def line_problem(text: str) -> str | None:
    """Why one input line cannot be translated (before any model runs), or None."""
    from nmt.serving import MAX_CHARS

    if problem := unicode_problem(text):
        return problem
    if len(text) > MAX_CHARS:
        return (f"{len(text):,} characters; the limit is {MAX_CHARS} per line (one sentence per "
                "line): split it")
    return None


def stdin_lines() -> Iterator[tuple[str | None, str | None]]:
    """(text, None) per stdin line, or (None, reason) for a line that is not UTF-8; lazily."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream (tests): already decoded
        for line in sys.stdin:
            yield line.rstrip("\r\n"), None
        return
    for number, data in enumerate(raw, start=1):
        data = data.rstrip(b"\r\n")
        if number == 1:
            data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
        try:
            yield data.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            yield None, (f"not valid UTF-8 at byte {exc.start} "
                         f"({data[exc.start:exc.start + 4]!r})")


def _chunks(items: Iterable[tuple[str | None, str | None]],
            size: int) -> Iterator[list[tuple[str | None, str | None]]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def cmd_translate(args: argparse.Namespace) -> int:
    """Translate arguments or stdin lines, streamed in chunks; bad lines reported and skipped."""
    from nmt.model_ref import ModelNotFoundError, open_translator  # torch/mlflow: import late
    from nmt.tracking import TrackingError

    if args.beam is not None:  # before reading stdin or loading anything
        try:
            check_beam(args.beam, args.nbest or 1, beam_key="--beam", nbest_key="--nbest")
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    sentences = list(args.sentences)
    from_stdin = not sentences or sentences == ["-"]
    if from_stdin and (sys.stdin is None or (not sentences and sys.stdin.isatty())):
        print("error: give sentences as arguments or pipe lines on stdin", file=sys.stderr)
        return 1
    try:
        model, uri = resolve_model(args.model, args.params)
        translate = open_translator(model, uri, int8=args.int8, full_vocab=args.full_vocab,
                                    precision=args.precision)
    except (ConfigError, ModelNotFoundError, TrackingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    where = "stdin line" if from_stdin else "argument"
    lines = stdin_lines() if from_stdin else ((s, None) for s in sentences)
    first, failed = 0, 0
    for chunk in _chunks(lines, CHUNK_LINES):
        texts: list[str] = []
        for offset, (text, problem) in enumerate(chunk):
            problem = problem or line_problem(text or "")
            if problem:
                failed += 1
                print(f"error: {where} {first + offset + 1}: {problem}; left out (empty output "
                      "line)", file=sys.stderr)
                chunk[offset] = (None, problem)
            else:
                texts.append(text or "")
        try:
            results = iter(translate(texts, args.beam, args.nbest, args.batch_size))
        except (ModelNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for offset, (text, _) in enumerate(chunk):
            _write(first + offset, None if text is None else next(results), args.nbest)
        sys.stdout.flush()
        first += len(chunk)
    if failed:
        print(f"error: {failed} of {first} lines were not translated (see above)",
              file=sys.stderr)
    return 1 if failed else 0


def _write(index: int, result: object, nbest: int | None) -> None:
    """One output line (nbest 1; "" for a skipped line) or nbest lines LINE<TAB>SCORE<TAB>TEXT."""
    if nbest in (None, 1):
        print("" if result is None else result.translation)  # type: ignore[attr-defined]
    elif result is not None:
        print("\n".join(f"{index}\t{h.score:.4f}\t{h.translation}"
                        for h in result.nbest))  # type: ignore[attr-defined]


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model over HTTP (MLflow's scoring API behind `nmt.rest.RequestGuard`)."""
    from mlflow.exceptions import MlflowException

    from nmt.model_ref import ModelNotFoundError, is_model_uri
    from nmt.rest import serve, serve_threads

    try:
        serve_threads(args.threads)  # before torch loads (OpenMP reads it then)
        if args.compile:
            from nmt.serving import COMPILE_ENV

            os.environ[COMPILE_ENV] = "1"  # read where the pyfunc loads (nmt.serving)
        model, uri = resolve_model(args.model, args.params)
        if is_model_uri(model):
            import mlflow

            mlflow.set_tracking_uri(uri)
        serve(model, host=args.host, port=args.port)
    except (ConfigError, UsageError, ModelNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (MlflowException, OSError) as exc:
        print(f"error: cannot load {model}: {exc}; `dvc repro export` registers the project's "
              "model", file=sys.stderr)
        return 1
    except ValueError as exc:  # a deploy setting: NMT_PRECISION, NMT_INT8, NMT_COMPILE, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="nmt", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nmt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    params_help = "params file (default: params.yaml of the project this folder is in)"

    p = sub.add_parser("translate", help="translate English sentences (arguments or stdin lines)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sentences", nargs="*", help="English sentences; none or '-': read stdin")
    p.add_argument("--model", default=None, help="model folder, runs:/..., models:/NAME@ALIAS "
                   "(default: models:/<export.registered_model>@champion)")
    p.add_argument("--params", type=Path, default=None, help=params_help)
    p.add_argument("--beam", type=int, default=None, help=f"beam size in [1, {MAX_BEAM_SIZE}], "
                   "1 = greedy (default: the model's evaluate.search.beam_size)")
    p.add_argument("--nbest", type=int, default=None, help="hypotheses per sentence, printed as "
                   "LINE<TAB>SCORE<TAB>TEXT when > 1 (LINE counts from 0)")
    p.add_argument("--batch-size", type=int, default=None, help="sentences decoded together "
                   "(default: the model's evaluate.search.batch_size, scaled to keep its "
                   "hypotheses per batch at another --beam: greedy takes 5x the sentences)")
    p.add_argument("--int8", action="store_true", help="decode with an int8 copy of the model "
                   "(CPU only; faster, outputs may differ slightly from fp32)")
    p.add_argument("--precision", choices=DECODE_PRECISIONS, default=None, help="decoding "
                   "precision: bf16 (CPUs with bf16 units), fp32, or auto = bf16 where the CPU "
                   "has bf16 units (default: the model's evaluate.search.precision)")
    p.add_argument("--full-vocab", action="store_true", help="search the whole target "
                   "vocabulary instead of the model's lexical shortlist (slower)")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("serve", help="serve a model over HTTP (POST /invocations)")
    p.add_argument("--model", "-m", default=None, help="model folder with an MLmodel file, "
                   "runs:/... or models:/NAME@ALIAS (default: the registered champion)")
    p.add_argument("--params", type=Path, default=None, help=params_help)
    p.add_argument("--host", "-H", default="127.0.0.1", help="address to listen on "
                   "(default: 127.0.0.1, this machine only)")
    p.add_argument("--port", "-p", type=int, default=5001, help="port (default: 5001)")
    p.add_argument("--threads", type=int, default=None, help="PyTorch intra-op threads per "
                   "request (default: OMP_NUM_THREADS if set, else 1: faster on MLflow's "
                   "worker threads; see nmt.rest.serve_threads)")
    p.add_argument("--compile", action="store_true", help="compile a Transformer's encoder and "
                   "decoder step at start-up, in the decoding precision (about 2x faster "
                   "one-sentence requests; about a minute once per model and machine, then "
                   "cached; needs a C++ compiler, else decodes eagerly; same as NMT_COMPILE=1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("params", help="check params.yaml and print the resolved values")
    p.add_argument("--params", type=Path, default=None, help=params_help)
    p.add_argument("--profile", type=Path, default=None, help="YAML of overrides merged over "
                   "the params file (e.g. tests/fixtures/params_tiny.yaml)")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("stats", help="print the last vectorize statistics")
    p.add_argument("--stats", type=Path, default=None, help="statistics file (default: "
                   "reports/vectorize/stats.json of the project this folder is in)")
    p.set_defaults(func=cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nmt` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
