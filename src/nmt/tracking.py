"""MLflow, in one place: tracking URI, runs, params, tags, artifacts and the run hand-off.

Only this module (and the Lightning `MLFlowLogger` it builds) talks to MLflow about runs; the
model registry (versions, aliases, promotion) is `nmt.registry`.

Tracking URI: the `MLFLOW_TRACKING_URI` environment variable, else `tracking.tracking_uri` from
params. A relative SQLite path (`sqlite:///mlflow.db`) is resolved against the repository root,
and new experiments store artifacts under `<repo>/mlruns/<experiment>`, so neither depends on the
working directory. Inside a DVC experiment's temporary clone (`<repo>/.dvc/tmp/exps/<tmp>`, used
by `dvc exp run --queue` and `--temp`) the repository root is the main repository, not the clone
DVC deletes after the run. An http(s) server must answer within `CONNECT_TIMEOUT_S` before
anything is trained (`TrackingError` otherwise).

HTTP retries: MLflow retries every failed request 7 times with backoff factor 2 (about 4 minutes
per call, several calls per step). Unless the environment sets them, `bound_http_retries` sets
`MLFLOW_HTTP_REQUEST_MAX_RETRIES=2`, `MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1` and
`MLFLOW_HTTP_REQUEST_TIMEOUT=30`: a server that dies mid-run fails the stage within about a
minute (`HTTP_RETRY_DEFAULTS`), not after a quarter of an hour.

Run hand-off: the train stage writes `models/run.json` (run id, experiment id, tracking URI,
experiment name); `open_run(run_json)` reopens that run so evaluate/export log into it too.

Size: one module past the ~300-line guideline on purpose: it is the one place that talks to
MLflow about runs (style.md: one place per concern), so the URI, store checks, retries and run
hand-off stay together.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from nmt.config import Params, TrackingConfig, flatten
from nmt.io import write_json

if TYPE_CHECKING:
    from lightning.pytorch.loggers import MLFlowLogger

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # an http tracking server must answer /health within this
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
DVC_TEMP_CLONE = re.compile(r"^(?P<main>.+)/\.dvc/tmp/exps/[^/]+(?:/.*)?$")
ENV_URI = "MLFLOW_TRACKING_URI"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
StoreError = mlflow.exceptions.MlflowException  # what a failing store raises (after retries)


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used; nothing was trained."""


@dataclass(frozen=True)
class RunRef:
    """Enough to find a run again (the content of `models/run.json`)."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    experiment: str


# --------------------------------------------------------------------------- store and runs
def main_repo_root(repo_root: Path) -> Path:
    """The repository a DVC experiment's temporary clone belongs to, else `repo_root` itself."""
    root = Path(repo_root).resolve()
    match = DVC_TEMP_CLONE.match(root.as_posix())
    return Path(match.group("main")) if match else root


def resolve_tracking_uri(cfg: TrackingConfig, repo_root: Path) -> str:
    """`MLFLOW_TRACKING_URI` or `tracking.tracking_uri`, relative SQLite paths made absolute
    (against the main repository when running in a DVC experiment's temporary clone)."""
    uri = os.environ.get(ENV_URI) or cfg.tracking_uri
    match = re.fullmatch(r"sqlite:///(?!/)(.+)", uri)
    if match:
        uri = f"sqlite:///{(main_repo_root(repo_root) / match.group(1)).as_posix()}"
    return uri


def bound_http_retries() -> dict[str, str]:
    """Apply `HTTP_RETRY_DEFAULTS` where the environment leaves them unset; returns what is used."""
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in HTTP_RETRY_DEFAULTS}


def check_reachable(uri: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast on an http(s) store that does not answer; make the SQLite file's folder."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            pass  # the server answered, just not on /health
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} did not answer within {timeout_s:.0f} s ({exc}); "
                f"start it, or point {ENV_URI} / tracking.tracking_uri at a reachable store"
            ) from exc
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        if db.is_file():
            check_sqlite_store(db)


def check_sqlite_store(db: Path) -> None:
    """Raise TrackingError naming `db` unless it is a readable SQLite file (read-only check).

    MLflow would otherwise fail deep inside sqlalchemy with a traceback that names no file.
    `PRAGMA quick_check` reads every page, so a truncated file is caught too (well under a
    second for a store of tens of MB).
    """
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
            rows = con.execute("PRAGMA quick_check").fetchall()
        problem = None if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:3])
    except sqlite3.Error as exc:
        problem = str(exc)
    if problem:
        raise TrackingError(
            f"{db}: not a readable MLflow store ({problem}); restore it from a backup, or move "
            f"it aside (`mv {db} {db}.broken`) and rerun `dvc repro --force train` to start a "
            "new store (the old runs and registered models stay in the moved file)")


def _experiment_id(client: MlflowClient, name: str, repo_root: Path, uri: str) -> str:
    """Id of experiment `name`, created if missing; safe when parallel runs race to create it."""
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "deleted":
        return exp.experiment_id
    location = None
    if not uri.startswith(("http://", "https://", "databricks")):
        location = (main_repo_root(repo_root) / "mlruns" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        exp = client.get_experiment_by_name(name)  # a parallel run created it first
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(repo_root: Path) -> str | None:
    """`git rev-parse HEAD`, or None without git or commits."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def data_version(repo_root: Path, data_dir: Path) -> str | None:
    """md5 that `dvc.lock` records for the `data_dir` output, if any stage lists it."""
    lock = Path(repo_root) / "dvc.lock"
    try:
        rel = Path(data_dir).resolve().relative_to(Path(repo_root).resolve()).as_posix()
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    except (OSError, ValueError, yaml.YAMLError):
        return None
    for stage in stages.values():
        for out in stage.get("outs", []):
            if str(out.get("path", "")).rstrip("/") == rel:
                return out.get("md5")
    return None


def run_tags(repo_root: Path, data_dir: Path, extra: Mapping[str, str] | None = None) -> dict:
    """Git commit, data version, DVC experiment name/baseline, plus `extra`."""
    commit = git_commit(repo_root)
    tags = {"mlflow.source.git.commit": commit, "git_commit": commit,
            "data_version": data_version(repo_root, data_dir),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
            "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV"), **(extra or {})}
    if tags["dvc_exp_name"]:
        tags["mlflow.runName"] = tags["dvc_exp_name"]
    return {k: str(v) for k, v in tags.items() if v}


def default_run_name() -> str:
    """`train-YYYYMMDD-HHMMSS-xxxx` (UTC, random suffix) for runs outside `dvc exp run`.

    MLflow's own names come from Python's `random`, which the train stage seeds before the run
    starts: every run would get the same name. `secrets` is not seeded.
    """
    return f"train-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def start_run(params: Params, repo_root: Path, tags: Mapping[str, str]) -> RunRef:
    """Create a RUNNING run in the params' experiment and log every param by dotted key."""
    uri = resolve_tracking_uri(params.tracking, repo_root)
    bound_http_retries()
    check_reachable(uri)
    client = MlflowClient(uri)
    try:
        exp_id = _experiment_id(client, params.tracking.experiment, repo_root, uri)
        run_name = None if "mlflow.runName" in tags else default_run_name()
        run = client.create_run(exp_id, tags=dict(tags), run_name=run_name)
        items = [Param(k, str(v)) for k, v in flatten(params)]
        for start in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[start : start + 100])
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"cannot use MLflow store {uri}: {exc}") from exc
    log.info("MLflow run %s in experiment %r at %s", run.info.run_id,
             params.tracking.experiment, uri)
    return RunRef(run.info.run_id, exp_id, uri, params.tracking.experiment)


def run_status(ref: RunRef) -> str:
    return MlflowClient(ref.tracking_uri).get_run(ref.run_id).info.status


def end_run(ref: RunRef, status: str) -> None:
    """Set a terminal status: FINISHED, FAILED or KILLED."""
    assert status in TERMINAL, status
    MlflowClient(ref.tracking_uri).set_terminated(ref.run_id, status)


def kill_if_running(ref: RunRef) -> bool:
    """Mark a run left RUNNING by a killed process as KILLED; True if it was changed."""
    try:
        if run_status(ref) != RunStatus.to_string(RunStatus.RUNNING):
            return False
    except mlflow.exceptions.MlflowException:
        return False  # deleted, or another store
    end_run(ref, "KILLED")
    return True


# ------------------------------------------------------------------------------ logging
def log_metrics(ref: RunRef, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log `metrics` at `step` with the current time.

    A real timestamp matters when a stage logs the same keys again into the same run (evaluate
    re-run after a decoding change): MLflow then shows the newest value, and logging a model
    from the run (export) copies one value per key and step instead of failing on two values
    with the same (key, timestamp, step).
    """
    client = MlflowClient(ref.tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(ref.run_id, metrics=[Metric(k, float(v), now, step)
                                          for k, v in metrics.items()])


def logged_metrics(ref: RunRef) -> dict[str, float]:
    """The run's latest value of every metric."""
    return dict(MlflowClient(ref.tracking_uri).get_run(ref.run_id).data.metrics)


def set_tags(ref: RunRef, tags: Mapping[str, str]) -> None:
    client = MlflowClient(ref.tracking_uri)
    for key, value in tags.items():
        client.set_tag(ref.run_id, key, str(value))


def log_artifact(ref: RunRef, path: Path, artifact_path: str | None = None) -> None:
    """Log a file or a whole folder."""
    client = MlflowClient(ref.tracking_uri)
    if Path(path).is_dir():
        client.log_artifacts(ref.run_id, str(path), artifact_path)
    else:
        client.log_artifact(ref.run_id, str(path), artifact_path)


def log_text(ref: RunRef, text: str, artifact_file: str) -> None:
    MlflowClient(ref.tracking_uri).log_text(ref.run_id, text, artifact_file)


def lightning_logger(ref: RunRef) -> MLFlowLogger:
    """A Lightning logger writing metrics into `ref`; it leaves the run status to `end_run`."""
    from lightning.pytorch.loggers import MLFlowLogger

    class _RunLogger(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:
            """The caller ends the run after logging artifacts (see `end_run`)."""

    return _RunLogger(experiment_name=ref.experiment, tracking_uri=ref.tracking_uri,
                      run_id=ref.run_id, log_model=False)


# ----------------------------------------------------------------------------- hand-off
def write_run_json(path: Path, ref: RunRef) -> None:
    write_json(path, asdict(ref))


def read_run_json(path: Path) -> RunRef:
    """The run hand-off; TrackingError naming the file when it is not one (FileNotFoundError
    when missing)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return RunRef(**{k: str(data[k]) for k in ("run_id", "experiment_id", "tracking_uri",
                                                   "experiment")})
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise TrackingError(f"{path}: not a run hand-off file ({type(exc).__name__}: {exc}); "
                            "rebuild it with `dvc repro --force train`") from exc


@dataclass(frozen=True)
class RunHandle:
    """An open run (also MLflow's active run, so `mlflow.<flavor>.log_model` logs into it)."""

    ref: RunRef

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        log_metrics(self.ref, metrics, step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        set_tags(self.ref, tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        log_artifact(self.ref, path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        log_text(self.ref, text, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        MlflowClient(self.ref.tracking_uri).log_dict(self.ref.run_id, data, artifact_file)


@contextmanager
def open_run(run_json: Path) -> Iterator[RunHandle]:
    """Reopen the run recorded in `run_json`; FINISHED on exit, FAILED on an exception."""
    ref = read_run_json(run_json)
    bound_http_retries()
    check_reachable(ref.tracking_uri)
    mlflow.set_tracking_uri(ref.tracking_uri)
    with mlflow.start_run(run_id=ref.run_id):
        yield RunHandle(ref)
