#!/usr/bin/env python3
"""Team tracking: a project-local PostgreSQL + MLflow server with proxied artifacts.

    python scripts/team_tracking.py start    # initdb once, start PostgreSQL, then `mlflow server`
    python scripts/team_tracking.py status   # what runs where (URIs, pids, ports); exit 3 if down
    python scripts/team_tracking.py stop     # stop the MLflow server, then PostgreSQL (fast mode)
    python scripts/team_tracking.py start --db-only   # PostgreSQL only (restore, schema upgrade)
    python scripts/team_tracking.py start --s3-only   # the local S3 store only (a DVC remote)

Settings (flag, else environment variable, else default):

    --dir        TEAM_TRACKING_DIR            <repo>/.team-tracking (git-ignored state folder)
    --pg-port    TEAM_PG_PORT                 5433   (local PostgreSQL, listens on 127.0.0.1 only)
    --port       TEAM_MLFLOW_PORT             5001   (MLflow server, 127.0.0.1 only)
                 (ports not given: those of the last `start` in <dir>/state.json, else defaults)
    --workers    TEAM_MLFLOW_WORKERS          2      (uvicorn workers of the MLflow server)
    --backend    TEAM_BACKEND_STORE_URI       ""     (a managed PostgreSQL: no local cluster then;
                                                      password from PGPASSWORD / PGPASSFILE)
    --artifacts  TEAM_ARTIFACTS_DESTINATION   <dir>/artifacts (or s3://bucket/prefix: AWS_* and
                                                      MLFLOW_S3_ENDPOINT_URL from the environment;
                                                      with --s3 local: s3://nmt-mlflow/artifacts)
    --s3         TEAM_S3                      off    (`local`: also run a local S3-compatible store,
                                                      SeaweedFS, see scripts/team_s3.py)
    --s3-port    TEAM_S3_PORT                 8333   (its S3 endpoint, 127.0.0.1 only)
    --s3-buckets TEAM_S3_BUCKETS              nmt-dvc,nmt-mlflow (created at start if missing)
    --timeout    TEAM_START_TIMEOUT_S         120    (bound on waiting for /health)

State in <dir>: pg/ (cluster), run/ (socket), logs/, pgpass (0600, the `mlflow` role's generated
password), mlflow.pid, s3/ (the local store), state.json (what `status` reports), timings.log.
An s3:// artifacts destination is checked (bucket there, credentials accepted) before the MLflow
server starts.
When run as root, PostgreSQL runs as the `postgres` user (it refuses to run as root).
Exit codes: 0 ok, 1 failed to start/stop, 2 refused (port in use, lock file, bad setting),
3 `status` found something not running.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling team_s3.py, also when
import team_s3  # noqa: E402                                # this file is loaded by path (tests)

REPO = Path(__file__).resolve().parents[1]
DB_NAME = DB_USER = "mlflow"
DEFAULT_PG_PORT = 5433  # not 5432: leave a system PostgreSQL alone
DEFAULT_MLFLOW_PORT = 5001  # not 5000: `make ui` (SQLite) uses it
DEFAULT_S3_PORT = 8333  # SeaweedFS's S3 default; MinIO's 9000 is often taken by other tools
DEFAULT_S3_BUCKETS = "nmt-dvc,nmt-mlflow"  # DVC remote, MLflow artifacts
LOCAL_S3_ARTIFACTS = "s3://nmt-mlflow/artifacts"
PG_START_TIMEOUT_S = 60  # pg_ctl -w -t: wait for PostgreSQL to accept connections
STOP_TIMEOUT_S = 20  # SIGTERM -> SIGKILL grace for the MLflow server


class TeamError(RuntimeError):
    """A clear, user-facing failure; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Settings:
    """Resolved settings; paths absolute."""

    state: Path
    pg_port: int
    port: int
    workers: int
    backend: str  # "" = the local cluster
    artifacts: str
    timeout_s: float
    s3_local: bool = False  # also run the local S3 store (TEAM_S3=local)
    s3_port: int = DEFAULT_S3_PORT
    s3_buckets: tuple[str, ...] = tuple(DEFAULT_S3_BUCKETS.split(","))

    @property
    def local_pg(self) -> bool:
        return not self.backend

    @property
    def s3(self) -> team_s3.S3Store:
        return team_s3.S3Store(self.state / "s3", self.s3_port, self.s3_buckets)

    @property
    def s3_endpoint(self) -> str | None:
        """Where the MLflow server reaches an s3:// destination: the local store, else
        MLFLOW_S3_ENDPOINT_URL (unset: AWS itself)."""
        return self.s3.endpoint if self.s3_local else os.environ.get("MLFLOW_S3_ENDPOINT_URL")

    @property
    def pgdata(self) -> Path:
        return self.state / "pg"

    @property
    def sockdir(self) -> Path:
        return self.state / "run"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def pgpass(self) -> Path:
        return self.state / "pgpass"

    @property
    def pidfile(self) -> Path:
        return self.state / "mlflow.pid"

    @property
    def backend_uri(self) -> str:
        """The store URI (no password: libpq reads it from PGPASSFILE / PGPASSWORD)."""
        return self.backend or f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.pg_port}/{DB_NAME}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def log(message: str) -> None:
    print(f"team-tracking: {message}", flush=True)


def mask(uri: str) -> str:
    """Hide a password in a URI (`user:secret@` -> `user:***@`)."""
    return re.sub(r"(//[^:/@]+):[^@]*@", r"\1:***@", uri)


# ------------------------------------------------------------------------------ processes
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def port_holder(port: int) -> str:
    """`name (pid N)` of the process listening on `port`, when `ss` can tell."""
    try:
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    match = re.search(r'users:\(\("([^"]+)",pid=(\d+)', out)
    return f"{match.group(1)} (pid {match.group(2)})" if match else ""


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def require_free(port: int, what: str, env: str) -> None:
    if port_free(port):
        return
    holder = port_holder(port)
    raise TeamError(
        f"port {port} on 127.0.0.1 is already in use{' by ' + holder if holder else ''}; "
        f"the {what} cannot listen there. Stop that process, or pick another port: "
        f"{env}=<free port> make team-up", code=2)


def health(uri: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


# ----------------------------------------------------------------------------- PostgreSQL
def pg_bin(name: str) -> str:
    """A PostgreSQL client/server binary: TEAM_PG_BIN, PATH, or the newest Debian install."""
    candidates = [Path(os.environ["TEAM_PG_BIN"]) / name] if os.environ.get("TEAM_PG_BIN") else []
    if found := shutil.which(name):
        candidates.append(Path(found))
    candidates += sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                         key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
                         reverse=True)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise TeamError(f"PostgreSQL binary `{name}` not found (install postgresql, or set "
                    "TEAM_PG_BIN to its bin folder, or use a managed database via "
                    "TEAM_BACKEND_STORE_URI)", code=2)


def pg_os_user() -> str:
    """The OS user PostgreSQL runs as: `postgres` when we are root, else ourselves."""
    return "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name


def as_pg(args: list[str], check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a PostgreSQL command as the cluster's OS user."""
    full = ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C"})
    if check and proc.returncode != 0:
        raise TeamError(f"`{' '.join(args)}` failed ({proc.returncode}):\n"
                        f"{(proc.stdout + proc.stderr).strip()[-2000:]}")
    return proc


def pg_running(cfg: Settings) -> int | None:
    """The postmaster pid when the local cluster is running, else None."""
    if not (cfg.pgdata / "PG_VERSION").is_file():
        return None
    proc = as_pg([pg_bin("pg_ctl"), "status", "-D", str(cfg.pgdata)], check=False, timeout=20)
    match = re.search(r"PID: (\d+)", proc.stdout)
    return int(match.group(1)) if proc.returncode == 0 and match else None


def check_lock_file(cfg: Settings) -> None:
    """Remove a stale `postmaster.pid` (dead pid); refuse with advice when its pid is reused."""
    lock = cfg.pgdata / "postmaster.pid"
    if not lock.exists():
        return
    first = lock.read_text(errors="replace").splitlines()[:1]
    pid = int(first[0]) if first and first[0].strip().isdigit() else 0
    if pid and pid_alive(pid):
        cmd = cmdline(pid)[:80]
        if "postgres" in cmd:
            return  # a live postmaster: pg_ctl reports it
        raise TeamError(
            f"stale PostgreSQL lock file {lock}: it names PID {pid}, which is now another "
            f"process ({cmd or 'unknown'}), so PostgreSQL refuses to start. Make sure no "
            f"PostgreSQL uses {cfg.pgdata}, then remove it: rm {lock}", code=2)
    lock.unlink()
    for sock_lock in cfg.sockdir.glob(".s.PGSQL.*.lock"):
        sock_lock.unlink(missing_ok=True)
    log(f"removed stale lock file {lock} (PID {pid or '?'} is not running; PostgreSQL was "
        "not shut down cleanly, it recovers from its WAL on start)")


def ensure_pg_dirs(cfg: Settings) -> None:
    user = pwd.getpwnam(pg_os_user())
    for path in (cfg.pgdata, cfg.sockdir):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(path, user.pw_uid, user.pw_gid)
    pglog = cfg.logs / "postgres.log"
    pglog.touch()
    if os.geteuid() == 0:
        os.chown(pglog, user.pw_uid, user.pw_gid)
        probe = as_pg(["test", "-w", str(cfg.pgdata)], check=False)
        if probe.returncode != 0:
            raise TeamError(
                f"user `postgres` cannot reach {cfg.pgdata}: every parent folder must be "
                f"traversable (chmod o+x) by it, or put the state elsewhere with "
                f"TEAM_TRACKING_DIR=<folder>", code=2)


def init_cluster(cfg: Settings) -> None:
    if (cfg.pgdata / "PG_VERSION").is_file():
        return
    log(f"initdb {cfg.pgdata} (superuser `{pg_os_user()}`: peer auth on the socket only; "
        f"role `{DB_USER}`: password over TCP on 127.0.0.1)")
    as_pg([pg_bin("initdb"), "-D", str(cfg.pgdata), "-E", "UTF8", "--no-locale",
           "--auth-local=peer", "--auth-host=scram-sha-256"])


def start_pg(cfg: Settings) -> int:
    ensure_pg_dirs(cfg)
    init_cluster(cfg)
    if pid := pg_running(cfg):
        log(f"PostgreSQL already running (pid {pid})")
        return pid
    check_lock_file(cfg)
    require_free(cfg.pg_port, "PostgreSQL server", "TEAM_PG_PORT")
    opts = (f"-c listen_addresses=127.0.0.1 -p {cfg.pg_port} "
            f"-c unix_socket_directories={cfg.sockdir}")
    as_pg([pg_bin("pg_ctl"), "start", "-D", str(cfg.pgdata), "-l", str(cfg.logs / "postgres.log"),
           "-w", "-t", str(PG_START_TIMEOUT_S), "-o", opts], timeout=PG_START_TIMEOUT_S + 10)
    ensure_database(cfg)
    pid = pg_running(cfg)
    if pid is None:
        raise TeamError(f"PostgreSQL did not stay up; see {cfg.logs / 'postgres.log'}")
    return pid


def psql(cfg: Settings, sql: str, db: str = "postgres") -> str:
    out = as_pg([pg_bin("psql"), "-h", str(cfg.sockdir), "-p", str(cfg.pg_port), "-d", db,
                 "-U", pg_os_user(), "-v", "ON_ERROR_STOP=1", "-tAc", sql])
    return out.stdout.strip()


def ensure_database(cfg: Settings) -> None:
    """Create role and database `mlflow` once; the password lives only in `pgpass` (0600)."""
    password = read_password(cfg)
    if password is None:
        password = secrets.token_urlsafe(24)
        cfg.pgpass.write_text(f"127.0.0.1:*:{DB_NAME}:{DB_USER}:{password}\n")
        cfg.pgpass.chmod(0o600)
    if psql(cfg, f"SELECT 1 FROM pg_roles WHERE rolname = '{DB_USER}'") != "1":
        psql(cfg, f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{password}'")
    else:
        psql(cfg, f"ALTER ROLE {DB_USER} PASSWORD '{password}'")
    if psql(cfg, f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'") != "1":
        psql(cfg, f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")
        log(f"created database `{DB_NAME}` owned by role `{DB_USER}`")


def read_password(cfg: Settings) -> str | None:
    try:
        line = cfg.pgpass.read_text().strip()
    except OSError:
        return None
    return line.split(":", 4)[4] if line.count(":") >= 4 else None


def stop_pg(cfg: Settings) -> bool:
    if pg_running(cfg) is None:
        return False
    as_pg([pg_bin("pg_ctl"), "stop", "-D", str(cfg.pgdata), "-m", "fast", "-w", "-t", "60"],
          timeout=70)
    return True


# -------------------------------------------------------------------------------- MLflow
def mlflow_pid(cfg: Settings) -> int | None:
    """The MLflow server pid from the pid file when that process is alive and is mlflow."""
    try:
        pid = int(cfg.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) and "mlflow" in cmdline(pid) else None


def mlflow_exe() -> str:
    beside = Path(sys.executable).parent / "mlflow"
    found = str(beside) if beside.is_file() else shutil.which("mlflow")
    if not found:
        raise TeamError("the `mlflow` command is not installed in this environment", code=2)
    return found


def server_env(cfg: Settings) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": cfg.backend_uri,
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # The GenAI job runner starts 7 extra Python processes (huey consumers); this project runs
    # no server-side jobs, and on 2 cores they triple start-up time. Opt back in via the env.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    if cfg.local_pg:
        env["PGPASSFILE"] = str(cfg.pgpass)
    if cfg.s3_local:
        env["MLFLOW_S3_ENDPOINT_URL"] = cfg.s3.endpoint
    return env


def start_mlflow(cfg: Settings) -> int:
    if pid := mlflow_pid(cfg):
        if health(cfg.tracking_uri):
            log(f"MLflow server already running (pid {pid}) at {cfg.tracking_uri}")
            return pid
        raise TeamError(f"an MLflow server (pid {pid}) from {cfg.pidfile} is running but "
                        f"{cfg.tracking_uri}/health does not answer; run `make team-down` first")
    cfg.pidfile.unlink(missing_ok=True)
    require_free(cfg.port, "MLflow server", "TEAM_MLFLOW_PORT")
    if cfg.artifacts.startswith("s3://"):
        team_s3.check_bucket(cfg.artifacts, cfg.s3_endpoint, "the MLflow artifacts destination")
    elif not cfg.artifacts.startswith(("gs://", "wasbs://", "abfss://")):
        Path(cfg.artifacts).mkdir(parents=True, exist_ok=True)
    mlog = cfg.logs / "mlflow.log"
    cmd = [mlflow_exe(), "server", "--serve-artifacts", "--artifacts-destination", cfg.artifacts,
           "--host", "127.0.0.1", "--port", str(cfg.port), "--workers", str(cfg.workers)]
    with mlog.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cfg.state,
                                env=server_env(cfg), start_new_session=True)
    cfg.pidfile.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + cfg.timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            cfg.pidfile.unlink(missing_ok=True)
            raise TeamError(f"the MLflow server exited with code {proc.returncode} before "
                            f"answering; last lines of {mlog}:\n{team_s3.tail(mlog, 25)}")
        if health(cfg.tracking_uri):
            check_store(cfg, deadline)
            return proc.pid
        time.sleep(0.5)
    team_s3.kill_group(proc.pid, STOP_TIMEOUT_S)  # CLI, uvicorn, workers
    cfg.pidfile.unlink(missing_ok=True)
    raise TeamError(f"the MLflow server did not answer {cfg.tracking_uri}/health within "
                    f"{cfg.timeout_s:.0f} s (TEAM_START_TIMEOUT_S); stopped it. Last lines of "
                    f"{mlog}:\n{team_s3.tail(mlog, 25)}")


def check_store(cfg: Settings, deadline: float) -> None:
    """One database-backed request per worker: proves the store answers (not just /health) and
    makes the workers connect now; a worker without a connection that meets a database outage
    retries for ~100 s per request (MLflow's engine retry) instead of failing at once."""
    url = f"{cfg.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    for _ in range(cfg.workers):
        while True:
            try:
                with urllib.request.urlopen(url, timeout=max(1.0, deadline - time.monotonic())):
                    break
            except (urllib.error.URLError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise TeamError(f"the MLflow server answers /health but not {url} ({exc}); "
                                    f"see {cfg.logs / 'mlflow.log'}") from exc
                time.sleep(1)


def stop_mlflow(cfg: Settings) -> bool:
    pid = mlflow_pid(cfg)
    cfg.pidfile.unlink(missing_ok=True)
    if pid is None:
        return False
    team_s3.kill_group(pid, STOP_TIMEOUT_S)
    return True


# ------------------------------------------------------------------------------ commands
def save_state(cfg: Settings, **extra: object) -> None:
    state = {"tracking_uri": cfg.tracking_uri, "backend_store_uri": mask(cfg.backend_uri),
             "artifacts_destination": cfg.artifacts, "mlflow_port": cfg.port,
             "pg_port": cfg.pg_port if cfg.local_pg else None, "local_pg": cfg.local_pg,
             "workers": cfg.workers, "s3": "local" if cfg.s3_local else "off",
             "s3_port": cfg.s3_port, "s3_buckets": list(cfg.s3_buckets), **extra}
    (cfg.state / "state.json").write_text(json.dumps(state, indent=2) + "\n")


def record_timing(cfg: Settings, action: str, seconds: float) -> None:
    with (cfg.state / "timings.log").open("a") as out:
        out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {action} {seconds:.1f}s\n")


def preflight(cfg: Settings) -> None:
    """Refuse before touching anything when a port we still need is taken."""
    if cfg.local_pg and pg_running(cfg) is None:
        require_free(cfg.pg_port, "PostgreSQL server", "TEAM_PG_PORT")
    if mlflow_pid(cfg) is None:
        require_free(cfg.port, "MLflow server", "TEAM_MLFLOW_PORT")
    if cfg.s3_local and team_s3.store_pid(cfg.s3) is None:
        require_free(cfg.s3_port, "S3 store", "TEAM_S3_PORT")


def start_s3(cfg: Settings) -> int:
    """The local S3 store, up and holding its buckets; its pid."""
    t0 = time.monotonic()
    running = team_s3.store_pid(cfg.s3)
    if running is None:
        team_s3.credentials()  # refuse before anything starts when the keys are missing
        require_free(cfg.s3_port, "S3 store", "TEAM_S3_PORT")
    pid = team_s3.start_store(cfg.s3, cfg.timeout_s)
    what = "already running" if running else f"up in {time.monotonic() - t0:.1f} s"
    log(f"S3 store {what} (pid {pid}) at {cfg.s3.endpoint}, buckets "
        f"{', '.join(cfg.s3_buckets)}; data in {cfg.s3.state / 'data'}")
    return pid


def cmd_start(cfg: Settings, db_only: bool = False, s3_only: bool = False) -> int:
    t0 = time.monotonic()
    cfg.state.mkdir(parents=True, exist_ok=True)
    cfg.logs.mkdir(exist_ok=True)
    if s3_only:
        if not cfg.s3_local:
            raise TeamError("start --s3-only needs the local store: TEAM_S3=local (or --s3 local)",
                            code=2)
        pid = start_s3(cfg)
        save_state(cfg, s3_pid=pid, started_at=time.strftime("%FT%T"))
        log(f"S3 store only (--s3-only). For DVC: dvc remote modify <remote> endpointurl "
            f"{cfg.s3.endpoint}")
        return 0
    if cfg.s3_local and not db_only:
        team_s3.credentials()
    if db_only:
        if cfg.local_pg and pg_running(cfg) is None:
            require_free(cfg.pg_port, "PostgreSQL server", "TEAM_PG_PORT")
    else:
        preflight(cfg)
    pg_pid = start_pg(cfg) if cfg.local_pg else None
    t_pg = time.monotonic() - t0
    if db_only:
        if cfg.local_pg:
            log(f"PostgreSQL up in {t_pg:.1f} s (pid {pg_pid}); no MLflow server (--db-only). "
                f"Store: {cfg.backend_uri} (PGPASSFILE={cfg.pgpass})")
        return 0
    try:
        s3_pid = start_s3(cfg) if cfg.s3_local else None
        pid = start_mlflow(cfg)
    except (TeamError, team_s3.StoreError):
        if cfg.local_pg or cfg.s3_local:
            log("what started is left running; `make team-down` stops it")
        raise
    took = time.monotonic() - t0
    save_state(cfg, mlflow_pid=pid, pg_pid=pg_pid, s3_pid=s3_pid,
               started_at=time.strftime("%FT%T"),
               start_seconds=round(took, 1))
    record_timing(cfg, "start", took)
    where = f"PostgreSQL 127.0.0.1:{cfg.pg_port} (pid {pg_pid})" if cfg.local_pg \
        else f"database {mask(cfg.backend_uri)}"
    log(f"up in {took:.1f} s ({where} in {t_pg:.1f} s; MLflow server pid {pid}, "
        f"artifacts -> {cfg.artifacts})")
    log(f"export MLFLOW_TRACKING_URI={cfg.tracking_uri}")
    return 0


def cmd_stop(cfg: Settings) -> int:
    t0 = time.monotonic()
    stopped = []
    if stop_mlflow(cfg):
        stopped.append("MLflow server")
    if team_s3.stop_store(cfg.s3):
        stopped.append("S3 store")
    if cfg.local_pg and stop_pg(cfg):
        stopped.append("PostgreSQL")
    took = time.monotonic() - t0
    if stopped:
        record_timing(cfg, "stop", took)
        log(f"stopped {', '.join(stopped)} in {took:.1f} s")
    else:
        log("nothing was running")
    return 0


def cmd_status(cfg: Settings) -> int:
    saved = {}
    if (cfg.state / "state.json").is_file():
        saved = json.loads((cfg.state / "state.json").read_text())
    pid = mlflow_pid(cfg)
    ok = pid is not None and health(cfg.tracking_uri)
    state = "running" if ok else ("not answering" if pid else "stopped")
    s3_only = saved.get("s3_pid") is not None and saved.get("mlflow_pid") is None
    all_up = ok or s3_only
    if cfg.s3_local:
        s3_pid = team_s3.store_pid(cfg.s3)
        s3_ok = s3_pid is not None and team_s3.answers(cfg.s3)
        all_up = all_up and s3_ok
        s3_state = "running" if s3_ok else ("not answering" if s3_pid else "stopped")
        print(f"s3 store       {s3_state:<13} pid {s3_pid or '-':<8} {cfg.s3.endpoint}  buckets "
              f"{', '.join(cfg.s3_buckets)}  data {cfg.s3.state / 'data'}")
    if s3_only and not pid:
        return 0 if all_up else 3
    print(f"mlflow server  {state:<13} pid {pid or '-':<8} {cfg.tracking_uri}")
    print(f"  backend      {saved.get('backend_store_uri', mask(cfg.backend_uri))}")
    print(f"  artifacts    {saved.get('artifacts_destination', cfg.artifacts)} "
          "(clients see mlflow-artifacts:/, proxied by the server)")
    if cfg.local_pg:
        pg_pid = pg_running(cfg) if (cfg.pgdata / "PG_VERSION").is_file() else None
        all_up = all_up and pg_pid is not None
        print(f"postgresql     {'running' if pg_pid else 'stopped':<13} pid {pg_pid or '-':<8} "
              f"127.0.0.1:{cfg.pg_port}  data {cfg.pgdata}")
    else:
        print("postgresql     external      (TEAM_BACKEND_STORE_URI; not managed here)")
    print(f"logs           {cfg.logs}")
    if ok:
        print(f"use it:        export MLFLOW_TRACKING_URI={cfg.tracking_uri}")
    return 0 if all_up else 3


def settings(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path,
                        default=Path(env("TEAM_TRACKING_DIR") or REPO / ".team-tracking"))
    parser.add_argument("--pg-port", type=int, default=env("TEAM_PG_PORT"))
    parser.add_argument("--port", type=int, default=env("TEAM_MLFLOW_PORT"))
    parser.add_argument("--workers", type=int, default=int(env("TEAM_MLFLOW_WORKERS") or 2))
    parser.add_argument("--backend", default=env("TEAM_BACKEND_STORE_URI") or "")
    parser.add_argument("--artifacts", default=env("TEAM_ARTIFACTS_DESTINATION") or "")
    parser.add_argument("--db-only", action="store_true",
                        help="start: only PostgreSQL (for pg_restore or `mlflow db upgrade`)")
    parser.add_argument("--s3", choices=["off", "local"], default=env("TEAM_S3") or None)
    parser.add_argument("--s3-port", type=int, default=env("TEAM_S3_PORT"))
    parser.add_argument("--s3-buckets", default=env("TEAM_S3_BUCKETS") or DEFAULT_S3_BUCKETS)
    parser.add_argument("--s3-only", action="store_true",
                        help="start: only the local S3 store (a DVC remote; needs --s3 local)")
    parser.add_argument("--timeout", type=float,
                        default=float(env("TEAM_START_TIMEOUT_S") or 120))
    args = parser.parse_args(argv)
    state = args.dir.resolve()
    saved = {}  # ports of the last start, unless given again (so `status` finds a moved server)
    if (state / "state.json").is_file():
        saved = json.loads((state / "state.json").read_text())
    pg_port = int(args.pg_port or saved.get("pg_port") or DEFAULT_PG_PORT)
    port = int(args.port or saved.get("mlflow_port") or DEFAULT_MLFLOW_PORT)
    if args.backend and not args.backend.startswith(("postgresql", "mysql", "mssql")):
        parser.error(f"--backend / TEAM_BACKEND_STORE_URI must be a database URI "
                     f"(postgresql+psycopg://user@host:5432/db), got {mask(args.backend)!r}")
    if args.s3 not in (None, "off", "local"):
        parser.error(f"--s3 / TEAM_S3 must be `off` or `local`, got {args.s3!r}")
    s3_local = (args.s3 or saved.get("s3", "off")) == "local"
    s3_port = int(args.s3_port or saved.get("s3_port") or DEFAULT_S3_PORT)
    buckets = tuple(b.strip() for b in args.s3_buckets.split(",") if b.strip())
    artifacts = args.artifacts or (LOCAL_S3_ARTIFACTS if s3_local else str(state / "artifacts"))
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).resolve())
    return args, Settings(state, pg_port, port, args.workers, args.backend, artifacts,
                          args.timeout, s3_local, s3_port, buckets)


def main(argv: list[str] | None = None) -> int:
    args, cfg = settings(argv)
    try:
        if args.command == "start":
            return cmd_start(cfg, db_only=args.db_only, s3_only=args.s3_only)
        return {"stop": cmd_stop, "status": cmd_status}[args.command](cfg)
    except (TeamError, team_s3.StoreError) as exc:
        print(f"team-tracking: error: {exc}", file=sys.stderr, flush=True)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
