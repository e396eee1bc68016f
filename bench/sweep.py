"""Short sweep of the real train stage: one `pipelines/train.py` run per named set of overrides.

Each run trains from the same `data/processed` with `params.yaml` plus the sweep's `common`
overrides plus its own (deep-merged with `nmt.config.merge`, like the stage's `--profile`; every
run is checked before the first starts), into its own folder under `--out` with its own MLflow
store, so nothing of the project's models or runs is touched. One JSON line per run: the
overrides (the keys whose values differ from params.yaml), the stage's `metrics.json` (val/loss,
val/bleu, steps, tokens/s, wall seconds) and the CPU. Runs are sequential: on 2 cores two runs
at once would time each other.

Sweep file (YAML):
    common: {train: {max_steps: 300, val_every_steps: 300}}
    runs:
      t3x256_lr1e-3: {model: {arch: transformer, transformer: {layers: 3}}, train: {lr: 0.001}}

Usage: python bench/sweep.py SWEEP.yaml [--out /tmp/sweep] [--jsonl reports/tuning/x.jsonl]
                             [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from nmt.config import ConfigError, merge, parse_params, read_yaml
from nmt.precision import describe_cpu

REPO = Path(__file__).resolve().parents[1]


def plan(spec: dict[str, Any], only: list[str] | None) -> dict[str, dict[str, Any]]:
    """Each run's overrides (`common` then its own), checked against params.yaml before any run.

    A misspelt key, a bad value or an `--only` name the sweep lacks stops here, naming it, instead
    of failing (or silently running nothing) after earlier runs have spent their minutes.
    """
    runs = spec.get("runs") or {}
    if not isinstance(runs, dict) or not runs:
        raise SystemExit("the sweep file has no `runs:` mapping of name -> overrides")
    if missing := sorted(set(only or ()) - set(runs)):
        raise SystemExit(f"--only: no run named {', '.join(missing)} in the sweep "
                         f"(it has: {', '.join(runs)})")
    base = read_yaml(REPO / "params.yaml")
    planned = {}
    for name, overrides in runs.items():
        if only and name not in only:
            continue
        try:  # common first, then the run's own keys; both must exist in params.yaml
            combined = merge(merge(base, spec.get("common") or {}), overrides or {})
            parse_params(combined)
        except ConfigError as exc:
            raise SystemExit(f"sweep run {name!r}: {exc}") from None
        planned[name] = _diff(combined, base)
    return planned


def _diff(params: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The keys of `params` whose values differ from `base`, as a nested profile."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            if sub := _diff(value, base[key]):
                out[key] = sub
        elif value != base.get(key):
            out[key] = value
    return out


def run_one(name: str, overrides: dict[str, Any], out: Path, processed: Path) -> dict[str, Any]:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    profile = folder / "profile.yaml"
    profile.write_text(yaml.safe_dump(overrides, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    cmd = [sys.executable, str(REPO / "pipelines/train.py"), "--params",
           str(REPO / "params.yaml"), "--profile", str(profile), "--processed", str(processed),
           "--model-dir", str(folder / "model"), "--reports", str(folder / "reports")]
    start = time.perf_counter()
    with (folder / "train.log").open("w", encoding="utf-8") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            check=False).returncode
    row: dict[str, Any] = {"name": name, "overrides": overrides, "rc": rc,
                           "stage_s": round(time.perf_counter() - start, 1)}
    metrics = folder / "reports" / "metrics.json"
    if rc == 0 and metrics.is_file():
        row["metrics"] = json.loads(metrics.read_text(encoding="utf-8"))
    else:
        row["log_tail"] = (folder / "train.log").read_text(encoding="utf-8")[-2000:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/nmt-sweep"))
    parser.add_argument("--processed", type=Path, default=REPO / "data/processed")
    parser.add_argument("--jsonl", type=Path, help="also append each line to this file")
    parser.add_argument("--only", nargs="*", help="run only these names")
    args = parser.parse_args()
    if not args.sweep.is_file():
        raise SystemExit(f"sweep file {args.sweep}: not found")
    try:
        spec = read_yaml(args.sweep)
    except ConfigError as exc:  # not YAML, or not a mapping
        raise SystemExit(f"sweep file {exc.key}: {exc.reason}") from None
    cpu = describe_cpu()
    for name, overrides in plan(spec, args.only).items():
        row = {**run_one(name, overrides, args.out, args.processed.resolve()), "cpu": cpu}
        line = json.dumps(row)
        print(line, flush=True)
        if args.jsonl:
            with args.jsonl.open("a", encoding="utf-8") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
