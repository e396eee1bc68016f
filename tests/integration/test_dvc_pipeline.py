"""`dvc repro` on a copy of the project with the tiny profile: runs, then is a no-op."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_PROFILE, copy_project, free_port, run, write_params
from nmt.config import merge, read_yaml

COPY = ["dvc.yaml", "pipelines", "src", "data/external", "tests/fixtures/tiny", ".dvcignore"]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a command that must succeed; its stdout and stderr together."""
    proc = run(args, cwd, env)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A git + DVC copy of the project whose params.yaml is the tiny profile."""
    root = tmp_path_factory.mktemp("project")
    copy_project(root, COPY)
    write_params(root / "params.yaml", merge(read_yaml(REPO / "params.yaml"),
                                             read_yaml(TINY_PROFILE)))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db", GX_ANALYTICS_ENABLED="false")
    env.pop("DVC_EXP_NAME", None)
    _run(["git", "init", "-q"], root, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], root, env)
    return root, env


def test_repro_runs_every_stage_then_nothing(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    dvc = [sys.executable, "-m", "dvc"]
    first = _run([*dvc, "repro"], root, env)
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for name in stages:
        assert f"Running stage '{name}'" in first
    assert (root / "data/processed/train.parquet").is_file()
    lock = (root / "dvc.lock").read_text()
    second = _run([*dvc, "repro"], root, env)
    assert "Running stage" not in second
    assert "up to date" in second
    assert (root / "dvc.lock").read_text() == lock
    status = _run([*dvc, "status"], root, env)
    assert "up to date" in status


def test_forced_rerun_gives_identical_data_outputs(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "repro"], root, env)
    before = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    _run([*dvc, "repro", "-f", "vectorize", "--single-item"], root, env)
    _run([*dvc, "repro", "-f", "validate", "--single-item"], root, env)
    after = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    def data_outs(stages: dict, stage: str) -> list[dict]:
        # Data Docs embed run timestamps, so only the data outputs must match byte for byte.
        return [o for o in stages[stage]["outs"] if "docs" not in o["path"]]

    for stage in ("validate", "vectorize"):
        assert data_outs(before, stage) == data_outs(after, stage), stage
        assert data_outs(after, stage)
    metrics = json.loads(_run([*dvc, "metrics", "show", "--json"], root, env))
    assert metrics, "dvc metrics show returned nothing"


def test_temp_experiment_tracks_into_the_main_repos_default_store(
        project: tuple[Path, dict[str, str]]) -> None:
    """`dvc exp run --temp` (and queued runs) execute in .dvc/tmp/exps/<tmp>, deleted afterwards:
    the params' relative `sqlite:///mlflow.db` must still mean the main repository's store."""
    from mlflow.tracking import MlflowClient

    root, env = project
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "repro"], root, env)
    env = dict(env, GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@localhost",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@localhost")
    env.pop("MLFLOW_TRACKING_URI")  # the default from params.yaml: sqlite:///mlflow.db
    assert yaml.safe_load((root / "params.yaml").read_text())["tracking"]["tracking_uri"] == (
        "sqlite:///mlflow.db")
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\n__pycache__/\n")
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-q", "-m", "baseline"], root, env)
    _run([*dvc, "exp", "run", "--temp", "-n", "temp-lr4", "-S", "train.lr=0.004", "train"],
         root, env)
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name(
        yaml.safe_load((root / "params.yaml").read_text())["tracking"]["experiment"])
    assert exp is not None, "no experiment in the main repository's mlflow.db"
    runs = client.search_runs([exp.experiment_id], "tags.dvc_exp_name = 'temp-lr4'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["train.lr"] == "0.004"
    assert exp.artifact_location.startswith((root / "mlruns").resolve().as_uri())
    run = runs[0]
    assert run.info.artifact_uri.startswith((root / "mlruns").resolve().as_uri())
    assert client.list_artifacts(run.info.run_id), "the run's artifacts were not kept"
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))


def test_a_stage_failing_on_params_or_environment_keeps_earlier_outputs(
        project: tuple[Path, dict[str, str]]) -> None:
    """DVC deletes a stage's outputs before running it: bad params must stop `dvc repro` before
    that (check_params), and a stage failing on its environment keeps its persisted outputs."""
    root, env = project
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "repro"], root, env)
    kept = ["models/run.json", "models/model.pt", "reports/train/metrics.json",
            "reports/train/history.csv", "reports/train/samples.md", "reports/train/steps.csv",
            "data/raw/fra-eng.zip",
            "data/raw/fra-eng.zip.sha256", "reports/evaluate/metrics.json"]
    before = {rel: (root / rel).read_bytes() for rel in kept}
    good = (root / "params.yaml").read_text()

    def repro_fails(*args: str, env: dict[str, str] = env) -> str:
        proc = run([*dvc, "repro", *args], root, env, ok=False)
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert "Traceback" not in proc.stdout + proc.stderr
        for rel in kept:
            assert (root / rel).is_file(), f"{rel} was deleted"
            assert (root / rel).read_bytes() == before[rel], f"{rel} was changed"
        return proc.stdout + proc.stderr

    try:
        raw = yaml.safe_load(good)
        raw["train"]["lr"] = "1e-3"  # what YAML makes of `lr: 1e-3`
        write_params(root / "params.yaml", raw)
        out = repro_fails()
        assert "train.lr: expected float, got str '1e-3'" in out
        assert "Running stage 'train'" not in out

        (root / "params.yaml").write_text(good)
        uri = f"http://127.0.0.1:{free_port()}"
        out = repro_fails("-f", "--single-item", "train",
                          env=dict(env, MLFLOW_TRACKING_URI=uri))
        assert f"MLflow tracking server {uri} did not answer" in out

        raw = yaml.safe_load(good)
        raw["download"]["max_uncompressed_bytes"] = 1000  # the archive is refused
        write_params(root / "params.yaml", raw)
        out = repro_fails()
        assert "data/raw/fra-eng.zip left as it was" in out
    finally:
        (root / "params.yaml").write_text(good)
    # check_params recorded the valid-but-refused download value; only it reruns (same output)
    out = _run([*dvc, "repro"], root, env)
    assert [line for line in out.splitlines() if line.startswith("Running stage")] == [
        "Running stage 'check_params':"]
    assert "up to date" in _run([*dvc, "status"], root, env)
