"""Retrain and compare against a base revision: what `.github/workflows/retrain.yml` runs.

The same command works locally and in CI:

    python scripts/retrain.py --base main                      # workspace params vs main
    python scripts/retrain.py --base HEAD~1 -S train.lr=0.001  # one override, as an experiment
    python scripts/retrain.py --profile tests/fixtures/params_tiny.yaml --base HEAD

Steps:
1. `--pull`: `dvc pull --allow-missing` from the default remote; no remote, an empty remote or
   an unreachable one only logs a warning (the pipeline then recomputes what is missing).
2. `dvc exp run [-n NAME] -S k=v ... evaluate`: runs the pipeline up to `evaluate` as a DVC
   experiment. `--profile FILE` (e.g. the tiny profile) and `-S/--set` become `-S` overrides, so
   nothing is committed: the experiment is recorded under refs/exps (see `dvc exp show`), its
   results are applied to the workspace, and stages get `DVC_EXP_NAME`, which tracking.py puts
   on the MLflow run. A stage named by `--until` that dvc.yaml does not have yet runs the whole
   pipeline instead.
3. BLEU gate: `test/bleu` from `dvc metrics diff BASE --json --all`. It fails when the new value
   is lower than the base's by more than `--tolerance` BLEU points; it is skipped when the base
   has no `test/bleu` (first run, or evaluate not yet in the pipeline).
4. `--until export` and the gate passed: `dvc repro` runs the rest of the pipeline (export:
   parity check, MLflow registration and its own champion gate) with the same params.
5. `--push` and the gate passed: `dvc push` to the default remote.
6. Writes `--summary` (default reports/ci/summary.md): the gate verdict, then
   `dvc metrics diff BASE --md` and `dvc params diff BASE --md`.

Exit codes: 0 ok, 1 BLEU dropped by more than the tolerance, 2 bad arguments, 3 a DVC command or
a stage failed (the summary is still written when possible).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger("retrain")

BLEU_KEY = "test/bleu"  # the gated metric, as written by the evaluate stage
GATE_STAGE = "evaluate"  # runs (as an experiment) before the gate
EXIT_OK, EXIT_BLEU_DROP, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3


class CommandError(RuntimeError):
    """A DVC or git command exited non-zero."""


@dataclass(frozen=True)
class Gate:
    """The BLEU comparison against the base revision."""

    old: float | None
    new: float | None
    tolerance: float

    @property
    def checked(self) -> bool:
        return self.old is not None

    @property
    def passed(self) -> bool:
        if self.old is None:
            return True  # nothing to compare against
        if self.new is None or math.isnan(self.new):
            return False  # the base had a BLEU and this run has none
        return self.new >= self.old - self.tolerance

    def describe(self) -> str:
        if self.old is None:
            new = "none" if self.new is None else f"{self.new:.2f}"
            return f"**BLEU gate: SKIPPED**: the base has no `{BLEU_KEY}` (this run: {new})."
        if self.new is None:
            return f"**BLEU gate: FAIL**: the base has `{BLEU_KEY}` {self.old:.2f}, this run none."
        verdict = "PASS" if self.passed else "FAIL"
        return (f"**BLEU gate: {verdict}**: `{BLEU_KEY}` {self.old:.2f} -> {self.new:.2f} "
                f"({self.new - self.old:+.2f}; a drop of more than {self.tolerance:.2f} fails).")


# ------------------------------------------------------------------------------ overrides
def hydra_value(value: object) -> str:
    """One value in the override grammar `dvc exp run -S` uses (Hydra); strings are quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise TypeError(f"cannot pass a {type(value).__name__} as a -S override: {value!r}")


def flatten(raw: Mapping[str, object], prefix: str = "") -> Iterator[tuple[str, object]]:
    """`(dotted.key, leaf)` for every leaf of a nested mapping (lists are leaves)."""
    for key, value in raw.items():
        if isinstance(value, Mapping):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def profile_overrides(profile: Path) -> list[str]:
    """A profile file (nested params overrides) as `key=value` strings for `-S`."""
    raw = yaml.safe_load(profile.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{profile}: expected a mapping of params sections")
    return [f"{key}={hydra_value(value)}" for key, value in flatten(raw)]


# ------------------------------------------------------------------------------ commands
def _env() -> dict[str, str]:
    """This interpreter's bin dir first on PATH, so `python` in dvc.yaml is the same venv."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                GX_ANALYTICS_ENABLED=os.environ.get("GX_ANALYTICS_ENABLED", "false"))


def run(args: Sequence[str], cwd: Path, capture: bool = False) -> str:
    """Run a command; stream its output unless `capture`; raise CommandError on failure."""
    log.info("$ %s", shlex.join(args))
    proc = subprocess.run(list(args), cwd=cwd, env=_env(), text=True,
                          capture_output=capture)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip()[-2000:] if capture else "see the output above"
        raise CommandError(f"`{shlex.join(args)}` exited {proc.returncode}: {detail}")
    return proc.stdout if capture else ""


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def stage_names(root: Path) -> list[str]:
    """Stage names in dvc.yaml, in file order."""
    data = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    return list((data.get("stages") or {}).keys())


def pull(root: Path) -> str:
    """Fetch what the remote has; never fatal (no remote or an empty one is normal in CI)."""
    try:
        run(dvc("pull", "--allow-missing"), root)
    except CommandError as exc:
        log.warning("dvc pull failed, continuing without the remote: %s", exc)
        return "`dvc pull` failed (no or unreachable remote); stages recomputed what was missing."
    return "`dvc pull --allow-missing` fetched what the remote had."


# ------------------------------------------------------------------------------ comparing
def read_bleu(diff: Mapping[str, Mapping[str, Mapping[str, object]]]) -> tuple[object, object]:
    """(old, new) `test/bleu` from `dvc metrics diff --json --all`, evaluate's file first."""
    files = sorted(diff, key=lambda path: "evaluate" not in path)
    for path in files:
        entry = diff[path].get(BLEU_KEY)
        if isinstance(entry, Mapping):
            return entry.get("old"), entry.get("new")
    return None, None


def as_float(value: object) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def compare(root: Path, base: str, tolerance: float) -> tuple[Gate, str, str]:
    """The gate and the markdown metrics and params diffs of the workspace against `base`."""
    diff = json.loads(run(dvc("metrics", "diff", base, "--json", "--all"), root, True) or "{}")
    old, new = read_bleu(diff)
    gate = Gate(as_float(old), as_float(new), tolerance)
    metrics_md = run(dvc("metrics", "diff", base, "--md"), root, True).strip()
    params_md = run(dvc("params", "diff", base, "--md"), root, True).strip()
    return gate, metrics_md, params_md


def lock_note(root: Path) -> str:
    """Whether the run changed dvc.lock against HEAD (i.e. whether anything was retrained)."""
    head = subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=root, capture_output=True,
                          text=True)
    lock = root / "dvc.lock"
    now = lock.read_text(encoding="utf-8") if lock.exists() else None
    if head.returncode == 0 and head.stdout == now:
        return "`dvc.lock` matches HEAD: no stage had new inputs (outputs came from the cache)."
    return ("`dvc.lock` differs from HEAD: stages ran on new inputs. To keep this result, "
            "commit `dvc.lock`, `params.yaml` and the metrics (or `dvc exp apply <name>`).")


def render_summary(*, base: str, base_sha: str, gate: Gate | None, command: str,
                   metrics_md: str, params_md: str, notes: Sequence[str]) -> str:
    lines = [f"## Retraining vs `{base}` ({base_sha[:10]})", ""]
    lines.append(gate.describe() if gate else "**BLEU gate: NOT RUN** (the pipeline failed).")
    lines += ["", f"Pipeline: `{command}`", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", f"### Metrics diff (`dvc metrics diff {base} --md`)", "",
              metrics_md or "No metric changed.", "",
              f"### Params diff (`dvc params diff {base} --md`)", "",
              params_md or "No param changed.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD",
                        help="git revision to compare against (default: HEAD, the committed "
                             "metrics); CI passes the PR base or the previous push")
    parser.add_argument("--profile", type=Path, default=None,
                        help="params overrides file merged for this run only, e.g. "
                             "tests/fixtures/params_tiny.yaml (becomes -S overrides)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="params override, as `dvc exp run -S` "
                        "(repeatable; applied after --profile)")
    parser.add_argument("--until", choices=("evaluate", "export"), default="evaluate",
                        help="evaluate: no registry side effects (PRs); export: the whole "
                             "pipeline incl. MLflow registration, only after the gate passed")
    parser.add_argument("--tolerance", type=float, default=1.0,
                        help="BLEU points test/bleu may drop against the base (default 1.0)")
    parser.add_argument("--name", default=None, help="DVC experiment name (default: generated)")
    parser.add_argument("--pull", action="store_true", help="dvc pull first (never fatal)")
    parser.add_argument("--push", action="store_true",
                        help="dvc push to the default remote after a passing gate")
    parser.add_argument("--summary", type=Path, default=Path("reports/ci/summary.md"))
    parser.add_argument("--repo", type=Path, default=Path("."), help="project root")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not math.isfinite(args.tolerance):
        parser.error("--tolerance must be a finite number")
    if args.profile is not None and not args.profile.is_file():
        parser.error(f"--profile {args.profile}: no such file")
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"-S {item}: expected KEY=VALUE")
    return args


def exp_command(args: argparse.Namespace,
                stages: Sequence[str]) -> tuple[list[str], str, list[str]]:
    """The `dvc exp run` command for the gated part of the pipeline, how to show it, notes."""
    notes: list[str] = []
    from_profile = profile_overrides(args.profile) if args.profile else []
    cmd = ["exp", "run"] + (["--name", args.name] if args.name else [])
    for item in [*from_profile, *args.overrides]:
        cmd += ["-S", item]
    shown = ["dvc", "exp", "run"] + (["--name", args.name] if args.name else [])
    if from_profile:
        shown.append(f"<{len(from_profile)} -S from {args.profile}>")
        notes.append(f"Profile `{args.profile}` applied as {len(from_profile)} `-S` overrides "
                     "for this run only (not committed); see the params diff.")
    for item in args.overrides:
        shown += ["-S", item]
    if GATE_STAGE in stages:
        cmd.append(GATE_STAGE)
        shown.append(GATE_STAGE)
    else:
        notes.append(f"dvc.yaml has no `{GATE_STAGE}` stage yet: ran every stage it has.")
    return cmd, " ".join(shown), notes


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    root = args.repo.resolve()
    try:
        base_sha = run(["git", "rev-parse", "--verify", f"{args.base}^{{commit}}"], root,
                       True).strip()
    except CommandError as exc:
        log.error("--base %s is not a commit here (fetch more history?): %s", args.base, exc)
        return EXIT_USAGE
    stages = stage_names(root)
    exp_cmd, shown, notes = exp_command(args, stages)
    if args.pull:
        notes.append(pull(root))
    gate: Gate | None = None
    status = EXIT_OK
    try:
        run(dvc(*exp_cmd), root)
        gate, metrics_md, params_md = compare(root, args.base, args.tolerance)
        if not gate.passed:
            status = EXIT_BLEU_DROP
        elif args.until == "export":
            run(dvc("repro"), root)  # the remaining stages (export) with the same params
            notes.append("Gate passed: ran the whole pipeline (`dvc repro`), export included.")
            _, metrics_md, params_md = compare(root, args.base, args.tolerance)
        notes.append(lock_note(root))
        if status == EXIT_OK and args.push:
            run(dvc("push"), root)
            notes.append("`dvc push` sent the outputs to the default remote.")
    except CommandError as exc:
        log.error("%s", exc)
        notes.append(f"FAILED: {exc}")
        status = EXIT_FAILED
        metrics_md = params_md = "(not available: the pipeline failed)"
        try:
            _, metrics_md, params_md = compare(root, args.base, args.tolerance)
        except (CommandError, json.JSONDecodeError):
            pass
    text = render_summary(base=args.base, base_sha=base_sha, gate=gate,
                          command=shown, metrics_md=metrics_md,
                          params_md=params_md, notes=notes)
    summary = args.summary if args.summary.is_absolute() else root / args.summary
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(text, encoding="utf-8")
    print(text)
    if gate is not None:
        log.log(logging.INFO if gate.passed else logging.ERROR, "%s", gate.describe())
    log.info("summary written to %s (exit %d)", summary, status)
    return status


if __name__ == "__main__":
    sys.exit(main())
