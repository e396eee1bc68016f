"""The team tracking server (scripts/team_tracking.py): PostgreSQL + MLflow, proxied artifacts.

One server is started per pytest session (`shared_team_server`, also used by
test_parallel_experiments.py and test_mlflow_ui_browser.py) in a temporary state folder on free
ports, and stopped by a session cleanup whatever happens. Each test logs into its own experiment.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from conftest import REPO, free_port, require_system, tiny_raw, write_params

SCRIPT = REPO / "scripts" / "team_tracking.py"
START_TIMEOUT_S = 240  # bound on `start` (first start creates ~60 tables; cores are shared)
POSTGRES_INSTALL = "sudo apt-get install -y postgresql"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("team_tracking", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class TeamServer:
    """A started server: its state folder, ports and the script's flags for it."""

    state: Path
    pg_port: int
    port: int

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def flags(self) -> list[str]:
        return ["--dir", str(self.state), "--pg-port", str(self.pg_port), "--port",
                str(self.port), "--workers", "1", "--timeout", str(START_TIMEOUT_S)]

    def cli(self, command: str, *extra: str) -> subprocess.CompletedProcess:
        return run_script(command, *self.flags, *extra)


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=START_TIMEOUT_S + 60, env=env)


_SHARED: dict[str, TeamServer | str] = {}


def missing_postgres() -> str | None:
    """None when the script finds PostgreSQL's server binaries (as `start` does), else what."""
    if os.environ.get("TEAM_BACKEND_STORE_URI"):
        return None  # a managed database: no local PostgreSQL
    script = load_script()
    for name in ("initdb", "pg_ctl", "postgres"):
        try:
            script.pg_bin(name)
        except script.TeamError:
            return (f"PostgreSQL's `{name}` (searched: TEAM_PG_BIN, PATH, "
                    "/usr/lib/postgresql/*/bin)")
    return None


def shared_team_server(config: pytest.Config) -> TeamServer:
    """Start the session's server once (stopped and removed by a session cleanup)."""
    if "error" in _SHARED:
        pytest.fail(f"team server did not start earlier in this session:\n{_SHARED['error']}")
    if "server" in _SHARED:
        return _SHARED["server"]  # type: ignore[return-value]
    require_system(missing_postgres(), POSTGRES_INSTALL)
    # /tmp, not tmp_path: PostgreSQL runs as `postgres` and must traverse every parent folder.
    state = Path(tempfile.mkdtemp(prefix="nmt-team-"))
    state.chmod(0o755)
    server = TeamServer(state, free_port(), free_port())

    def cleanup() -> None:
        server.cli("stop")
        shutil.rmtree(state, ignore_errors=True)

    config.add_cleanup(cleanup)  # registered first: a half-started server is stopped too
    proc = server.cli("start")
    if proc.returncode != 0:
        _SHARED["error"] = proc.stdout + proc.stderr
        pytest.fail(f"`team_tracking.py start` failed:\n{_SHARED['error']}")
    _SHARED["server"] = server
    return server


@pytest.fixture(scope="session")
def team_server(request: pytest.FixtureRequest) -> TeamServer:
    return shared_team_server(request.config)


# --------------------------------------------------------------- the pipeline, in process
@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread, restored after: on 2 shared cores torch's default (spinning OpenMP
    workers) measured ~9x slower for the tiny model (train 55 s -> 6 s, evaluate 14 s -> 4 s)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@dataclass(frozen=True)
class StageRun:
    params: Path
    model_dir: Path
    reports: Path

    @property
    def run_id(self) -> str:
        return json.loads((self.model_dir / "run.json").read_text())["run_id"]


def train_and_evaluate(root: Path, processed: Path, experiment: str, *, exp_name: str = "",
                       **overrides: dict) -> StageRun:
    """train + evaluate stage entry points on the tiny profile into `root`, with the current
    MLFLOW_TRACKING_URI; `exp_name` plays DVC's `DVC_EXP_NAME` (the run's name and tag)."""
    import pipelines.evaluate as evaluate_stage
    import pipelines.train as train_stage

    root.mkdir(parents=True, exist_ok=True)
    overrides = {**overrides, "train": {"num_threads": 1, **overrides.get("train", {})}}
    params = write_params(root / "params.yaml", tiny_raw(tracking={"experiment": experiment},
                                                         **overrides))
    run = StageRun(params, root / "models", root / "reports")
    saved = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        os.environ["DVC_EXP_NAME"] = exp_name
    try:
        with one_torch_thread():
            assert train_stage.main(["--params", str(params), "--processed", str(processed),
                                     "--model-dir", str(run.model_dir),
                                     "--reports", str(run.reports / "train")]) == 0
            os.environ.pop("DVC_EXP_NAME", None)
            assert evaluate_stage.main(["--params", str(params), "--model-dir",
                                        str(run.model_dir), "--processed", str(processed),
                                        "--reports", str(run.reports / "evaluate"),
                                        "--device", "cpu"]) == 0
    finally:
        os.environ.pop("DVC_EXP_NAME", None)
        if saved is not None:
            os.environ["DVC_EXP_NAME"] = saved
    return run


@pytest.fixture()
def tracking_env(team_server: TeamServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    yield team_server.uri


# --------------------------------------------------------------------------------- tests
def test_status_reports_uris_pids_and_ports(team_server: TeamServer) -> None:
    proc = team_server.cli("status")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "mlflow server  running" in out and team_server.uri in out
    assert "postgresql     running" in out and f"127.0.0.1:{team_server.pg_port}" in out
    assert f"postgresql+psycopg://mlflow@127.0.0.1:{team_server.pg_port}/mlflow" in out
    assert f"export MLFLOW_TRACKING_URI={team_server.uri}" in out
    pid = int((team_server.state / "mlflow.pid").read_text())
    assert f"pid {pid}" in out
    again = team_server.cli("start")  # idempotent
    assert again.returncode == 0 and "already running" in again.stdout
    timings = (team_server.state / "timings.log").read_text()
    assert " start " in timings


def test_port_in_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_script("start", "--dir", str(state), "--pg-port", str(port),
                          "--port", str(free_port()))
        assert proc.returncode == 2
        assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr
        assert "TEAM_PG_PORT=<free port>" in proc.stderr
        assert not (state / "pg").exists()  # refused before initdb
        # an external database: only the MLflow port is ours
        proc = run_script("start", "--dir", str(state), "--port", str(port), "--backend",
                          "postgresql+psycopg://u@127.0.0.1:1/db")
        assert proc.returncode == 2
        assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr
        assert "TEAM_MLFLOW_PORT=<free port>" in proc.stderr


def test_stale_lock_file_is_removed_or_explained(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    tt = load_script()
    _, cfg = tt.settings(["start", "--dir", str(tmp_path)])
    cfg.pgdata.mkdir(parents=True)
    lock = cfg.pgdata / "postmaster.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    lock.write_text(f"{dead.pid}\n{cfg.pgdata}\n")
    tt.check_lock_file(cfg)
    assert not lock.exists()
    out = capsys.readouterr().out
    assert f"removed stale lock file {lock} (PID {dead.pid} is not running" in out
    lock.write_text(f"{os.getpid()}\n{cfg.pgdata}\n")  # a live pid that is not PostgreSQL
    with pytest.raises(tt.TeamError) as err:
        tt.check_lock_file(cfg)
    assert err.value.code == 2
    assert f"names PID {os.getpid()}, which is now another process" in str(err.value)
    assert f"rm {lock}" in str(err.value)
    assert lock.exists()


def run_train_stage(params: Path, processed: Path, tmp_path: Path) -> int:
    """The train stage in-process, outputs under `tmp_path`; its exit code."""
    import pipelines.train as train_stage

    return train_stage.main(["--params", str(params), "--processed", str(processed),
                             "--model-dir", str(tmp_path / "models"),
                             "--reports", str(tmp_path / "r")])


def test_unreachable_server_fails_train_naming_the_uri(tiny_data: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = write_params(tmp_path / "params.yaml", tiny_raw())
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR):
        rc = run_train_stage(params, tiny_data["processed"], tmp_path)
    assert rc == 1
    assert f"MLflow tracking server {uri} did not answer" in caplog.text
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "models" / "run.json").exists()


RUNS = {"ui-lr2": 0.002, "ui-lr5": 0.005}  # run name (plays DVC_EXP_NAME) -> train.lr
RUNS_EXPERIMENT = "team-check"


def shared_runs(config: pytest.Config, server: TeamServer, processed: Path) -> dict[str, StageRun]:
    """Two tiny train+evaluate runs on the session's server (made once; the pipeline and the
    browser tests both read them). Run 1 may be exported; nothing else changes them."""
    if "runs" not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="nmt-team-runs-"))
        config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))
        mp = pytest.MonkeyPatch()
        mp.setenv("MLFLOW_TRACKING_URI", server.uri)
        try:
            _SHARED["runs"] = {  # type: ignore[assignment]
                name: train_and_evaluate(root / name, processed, RUNS_EXPERIMENT, exp_name=name,
                                         train={"lr": lr},
                                         export={"registered_model": "team-translator"})
                for name, lr in RUNS.items()}
        finally:
            mp.undo()
    return _SHARED["runs"]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def server_runs(team_server: TeamServer, tiny_data: dict,
                request: pytest.FixtureRequest) -> dict[str, StageRun]:
    return shared_runs(request.config, team_server, tiny_data["processed"])


@pytest.mark.slow
def test_database_down_fails_clearly_then_runs_are_redone(team_server: TeamServer,
                                                          tracking_env: str, tiny_data: dict,
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture,
                                                          request: pytest.FixtureRequest) -> None:
    """PostgreSQL stopped under a running MLflow server: the stage fails fast naming the URI and
    creates nothing; after `start` (restarts PostgreSQL only) the same runs are done again."""
    from mlflow.tracking import MlflowClient

    tt = load_script()
    _, cfg = tt.settings(["status", *team_server.flags])
    experiment = "team-db-down"
    client = MlflowClient(tracking_env)
    client.search_experiments()  # the server has served requests (`start` does one per worker)
    assert tt.stop_pg(cfg)
    try:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
        params = write_params(tmp_path / "params.yaml",
                              tiny_raw(tracking={"experiment": experiment}))
        t0 = time.monotonic()
        with caplog.at_level(logging.ERROR):
            rc = run_train_stage(params, tiny_data["processed"], tmp_path)
        assert rc == 1
        assert f"cannot use MLflow store {tracking_env}" in caplog.text
        print(f"\ndatabase down: train exited 1 after {time.monotonic() - t0:.1f} s")
        assert time.monotonic() - t0 < 60
        assert team_server.cli("status").returncode == 3  # status notices
    finally:
        proc = team_server.cli("start")  # restarts PostgreSQL; the MLflow server kept running
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "MLflow server already running" in proc.stdout
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
    exp = client.get_experiment_by_name(experiment)
    assert exp is None or not client.search_runs([exp.experiment_id])  # nothing half-made
    assert not (tmp_path / "models" / "run.json").exists()
    runs = request.getfixturevalue("server_runs")  # the runs, done after the outage
    for run in runs.values():
        assert client.get_run(run.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_pipeline_logs_and_registers_on_the_server(team_server: TeamServer, tracking_env: str,
                                                   server_runs: dict[str, StageRun],
                                                   tiny_data: dict) -> None:
    """train + evaluate logged there, artifacts proxied into the server's folder; export
    registers `models:/team-translator@champion`, which `nmt translate` and `mlflow models
    serve` load from the server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_env)
    for name, run in server_runs.items():
        got = client.get_run(run.run_id)
        assert got.info.status == "FINISHED"
        assert got.info.run_name == name and got.data.tags["dvc_exp_name"] == name
        assert got.info.artifact_uri.startswith("mlflow-artifacts:/")
        metrics = json.loads((run.reports / "evaluate/metrics.json").read_text())
        assert got.data.metrics["test/bleu"] == pytest.approx(metrics["test/bleu"])
        assert "val/loss" in got.data.metrics
        assert float(got.data.params["train.lr"]) == pytest.approx(RUNS[name])
        stored = list((team_server.state / "artifacts").rglob("metrics.json"))
        assert any(run.run_id in str(p) for p in stored), "artifacts not in the server's folder"
        assert [a.path for a in client.list_artifacts(run.run_id, "reports/evaluate")]
    export_and_serve(server_runs["ui-lr2"], tiny_data["processed"], tracking_env, client)


def export_and_serve(run: StageRun, processed: Path, uri: str, client: object) -> None:
    """export registers `models:/<name>@champion` on the server; `nmt translate` and
    `mlflow models serve` load it from there (artifacts through the proxy)."""
    if not (REPO / "pipelines" / "export.py").is_file():
        pytest.skip("pipelines/export.py is not there yet (export stage)")
    import pipelines.export as export_stage

    from nmt.cli import main as nmt_main

    with one_torch_thread():
        assert export_stage.main([
            "--params", str(run.params), "--model-dir", str(run.model_dir),
            "--eval-metrics", str(run.reports / "evaluate/metrics.json"),
            "--test-data", str(processed / "test.parquet"),
            "--attribution", str(REPO / "data/external/ATTRIBUTION.md"),
            "--out-dir", str(run.model_dir / "export"), "--reports", str(run.reports / "export")
        ]) == 0
        name = read_yaml_key(run.params, "export", "registered_model")
        version = client.get_model_version_by_alias(name, "champion")  # type: ignore
        assert version.run_id == run.run_id
        assert nmt_main(["translate", "--params", str(run.params), "Be nice."]) == 0

    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true",
               OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    log = run.reports / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve",
                                  "-m", f"models:/{name}@champion", "--env-manager", "local",
                                  "--host", "127.0.0.1", "-p", str(port), "-w", "1"], env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        answer = post_when_up(f"http://127.0.0.1:{port}/invocations",
                              {"inputs": ["Be nice.", "Get out!"]}, serve, log, timeout_s=180)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)
    predictions = answer["predictions"]
    assert len(predictions) == 2 and all(isinstance(p["translation"], str) for p in predictions)


def read_yaml_key(path: Path, *keys: str) -> str:
    import yaml

    value = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in keys:
        value = value[key]
    return str(value)


def post_when_up(url: str, body: dict, proc: subprocess.Popen, log: Path,
                 timeout_s: float) -> dict:
    """POST `body` as JSON once the server answers (bounded); fail with its output if it dies."""
    data = json.dumps(body).encode()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = log.read_text(errors="replace")[-3000:]
            pytest.fail(f"`mlflow models serve` exited {proc.returncode}:\n{out}")
        request = urllib.request.Request(url, data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError):
            time.sleep(1)
    pytest.fail(f"`mlflow models serve` did not answer {url} within {timeout_s:.0f} s")
