"""One wrapper for every `pipelines/*.py` stage: arguments, logging, params, error policy.

A stage script builds its parser with `stage_parser` (which adds `--params` and `--profile`), adds
its own path options (each one matches a `deps`/`outs` entry in dvc.yaml, which is the only place
that holds the paths, so they have no defaults), and hands a body function to `run_stage`.

Error policy, the same for every stage:

- `ConfigError`, `FileNotFoundError` and the error types the stage names as expected (download,
  tracking, export parity...) become ONE line on stderr, `ERROR <stage>: <Type>: <message>`, and
  exit code 1, so `dvc repro` stops there.
- Any other exception is a bug: one line naming the exception and the file holding the full
  traceback (a temporary file), exit code 1. With `NMT_DEBUG=1` the traceback goes to stderr
  instead (the exception is re-raised).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from nmt.config import ConfigError, Params, load_params

DEBUG_ENV = "NMT_DEBUG"  # set to 1 to see raw tracebacks of unexpected errors
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

StageBody = Callable[[argparse.Namespace, Params], int]


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every stage takes: `--params` and `--profile`."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile", type=Path, default=None,
                        help="YAML file of overrides merged over --params (optional)")
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or repr(exc)
    return f"{type(exc).__name__}: {text}"


def _save_traceback(stage: str, exc: BaseException) -> Path | None:
    """Write the full traceback of `exc` to a temporary file; None when that fails too."""
    try:
        fd, name = tempfile.mkstemp(prefix=f"nmt-{stage}-", suffix=".traceback.txt")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("".join(traceback.format_exception(exc)))
        return Path(name)
    except OSError:
        return None


def run_stage(stage: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None,
              body: StageBody, expected: tuple[type[BaseException], ...] = ()) -> int:
    """Parse `argv`, set up logging, load params, run `body(args, params)`; return the exit code.

    Args:
        stage: the stage name (dvc.yaml), also the logger name of its messages.
        parser: from `stage_parser`, with the stage's own options added.
        argv: command-line arguments (None: `sys.argv[1:]`).
        body: the stage's work; returns 0 on success, 1 on an expected failure it logged itself.
        expected: error types (besides ConfigError and FileNotFoundError) that mean bad input or
            environment, reported as one line.

    Returns:
        The exit code: `body`'s, or 1 after any exception.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    log = logging.getLogger(stage)
    try:
        params = load_params(args.params, args.profile)
        return int(body(args, params))
    except (ConfigError, FileNotFoundError, *expected) as exc:
        log.error("%s", _one_line(exc))
        return 1
    except Exception as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        saved = _save_traceback(stage, exc)
        where = f"traceback in {saved}" if saved else "traceback could not be saved"
        log.error("unexpected error (a bug; please report it): %s; %s; rerun with %s=1 to "
                  "print it", _one_line(exc), where, DEBUG_ENV)
        return 1
