"""Four DVC experiments queued and run by two workers against the team server: none lost or merged.

In a git + DVC copy of the project (tiny profile): the data stages are reproduced and committed,
then `dvc exp run --queue -n NAME -S train.lr=.. -S model.hidden=..` four times and
`dvc queue start -j 2`. Each experiment must finish and own exactly one MLflow train run on the
team server, named and tagged with its DVC experiment name (`DVC_EXP_NAME`, set by DVC and
recorded by `nmt.tracking.run_tags`), with its own params and test BLEU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_team_server import TeamServer, shared_team_server

from conftest import REPO, TINY_PROFILE, copy_project, write_params
from conftest import run as run_command
from nmt.config import merge, read_yaml

pytestmark = pytest.mark.slow

COPY = ["dvc.yaml", "pipelines", "src", "data/external", "tests/fixtures/tiny", ".dvcignore"]
GITIGNORE = "mlflow.db\nmlflow.db-*\nmlruns/\nmlartifacts/\n__pycache__/\n"
DVC = [sys.executable, "-m", "dvc"]
EXPERIMENTS = {  # DVC experiment name -> overrides (train.lr, model.hidden)
    "lr2-h8": {"train.lr": 0.002, "model.hidden": 8},
    "lr2-h16": {"train.lr": 0.002, "model.hidden": 16},
    "lr5-h8": {"train.lr": 0.005, "model.hidden": 8},
    "lr5-h16": {"train.lr": 0.005, "model.hidden": 16},
}
QUEUE_TIMEOUT_S = 900  # bound on waiting for the queue (4 tiny experiments, 2 workers)


run = functools.partial(run_command, timeout=600)  # each git / dvc call of this test


def make_project(root: Path, uri: str, experiment: str) -> dict[str, str]:
    """A git + DVC copy (tiny profile) tracking into `uri`/`experiment`; returns its env."""
    copy_project(root, COPY)
    raw = merge(read_yaml(REPO / "params.yaml"), read_yaml(TINY_PROFILE))
    raw = merge(raw, {"tracking": {"experiment": experiment},
                      "export": {"registered_model": f"{experiment}-translator"}})
    write_params(root / "params.yaml", raw)
    (root / ".gitignore").write_text(GITIGNORE)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=uri, GX_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1",  # 2 workers, 2 cores
               GIT_AUTHOR_NAME="test",
               GIT_AUTHOR_EMAIL="test@localhost", GIT_COMMITTER_NAME="test",
               GIT_COMMITTER_EMAIL="test@localhost")
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT"):
        env.pop(var, None)
    run(["git", "init", "-q"], root, env)
    run([*DVC, "init", "-q"], root, env)
    run([*DVC, "config", "core.analytics", "false"], root, env)
    return env


def wait_for_queue(root: Path, env: dict[str, str]) -> str:
    """Poll `dvc queue status` until nothing is queued or running; return its last output."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        status = run([*DVC, "queue", "status"], root, env).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"queue not done within {QUEUE_TIMEOUT_S} s:\n{status}")
        time.sleep(5)


def start_queue(root: Path, env: dict[str, str], log: Path) -> None:
    """`dvc queue start -j 2`, its output to `log`, not to a pipe: the workers it leaves running
    inherit its stdout, and a pipe would stay open until the last of them exits (one worker
    once lingered for minutes after its queue emptied, so a captured run hung until timeout)."""
    with log.open("w") as out:
        proc = subprocess.run([*DVC, "queue", "start", "-j", "2"], cwd=root, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0, f"dvc queue start exited {proc.returncode}:\n{log.read_text()}"


def stop_workers(root: Path, grace_s: float = 30.0) -> None:
    """Stop the queue's workers (pid files under .dvc/tmp/exps/celery) still alive after
    `dvc queue stop` and a grace period, so none outlives the test: SIGTERM, then SIGKILL (the
    worker that lingered took tens of seconds to act on SIGTERM)."""
    pids = []
    for pid_file in (root / ".dvc/tmp/exps/celery").glob("*.pid"):
        try:
            pids.append(int(pid_file.read_text().strip()))
        except (OSError, ValueError):
            continue
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(1)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for pid in pids if _alive(pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # it may exit meanwhile
                os.kill(pid, sig)
        time.sleep(5 if pids else 0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process reuses the id
        return False
    return True


@pytest.fixture(scope="module")
def team_server(request: pytest.FixtureRequest) -> TeamServer:
    return shared_team_server(request.config)


def test_four_queued_experiments_two_workers_each_own_a_run(team_server: TeamServer,
                                                            tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    if "train" not in stages:
        pytest.skip("dvc.yaml has no train stage yet")
    target = "evaluate" if "evaluate" in stages else "train"
    experiment = f"parallel-{int(time.time())}"
    root = tmp_path / "project"
    env = make_project(root, team_server.uri, experiment)
    run([*DVC, "repro", "vectorize"], root, env)  # data once; experiments reuse it from cache
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "baseline: data stages"], root, env)

    # The MLflow experiment does not exist yet: the first two runs race to create it, and the
    # loser must reuse the winner's (nmt.tracking._experiment_id; before, 1 of 4 failed).
    client = MlflowClient(team_server.uri)
    assert client.get_experiment_by_name(experiment) is None
    for name, overrides in EXPERIMENTS.items():
        sets = [arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")]
        run([*DVC, "exp", "run", "--queue", "-n", name, *sets, target], root, env)
    t0 = time.monotonic()
    try:
        start_queue(root, env, tmp_path / "queue-start.log")
        status = wait_for_queue(root, env)
    finally:
        run([*DVC, "queue", "stop"], root, env, ok=False)
        stop_workers(root)
    took = time.monotonic() - t0
    for name in EXPERIMENTS:
        line = next((ln for ln in status.splitlines() if f" {name} " in f" {ln} "), "")
        if "Success" not in line:
            logs = run([*DVC, "queue", "logs", name], root, env, ok=False)
            pytest.fail(f"experiment {name}: {line or 'missing'}\n{status}\n"
                        f"{logs.stdout[-3000:]}{logs.stderr[-2000:]}")

    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} on {team_server.uri}"
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'train'")
    by_name: dict[str, list] = {}
    for r in runs:
        by_name.setdefault(r.data.tags.get("dvc_exp_name", "<untagged>"), []).append(r)
    assert sorted(by_name) == sorted(EXPERIMENTS), f"runs by DVC_EXP_NAME: {sorted(by_name)}"
    for name, overrides in EXPERIMENTS.items():
        (r,) = by_name[name]  # exactly one run: none lost, none merged
        assert r.info.status == "FINISHED", (name, r.info.status)
        assert r.info.run_name == name
        for key, value in overrides.items():
            assert float(r.data.params[key]) == pytest.approx(value), (name, key)
        if target == "evaluate":
            assert "test/bleu" in r.data.metrics, name
    assert len({r.info.run_id for r in runs}) == len(EXPERIMENTS)
    print(f"\n4 experiments, 2 workers: {took:.0f} s; runs: "
          + ", ".join(f"{n}={by_name[n][0].info.run_id}" for n in EXPERIMENTS))
