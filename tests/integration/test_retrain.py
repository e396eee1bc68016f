"""scripts/retrain.py end to end on the tiny profile, in a git + DVC copy of the project.

A baseline is reproduced and committed; the script then runs a changed param as a DVC
experiment against it (summary with metrics/params diff tables, MLflow run tagged with the
experiment name and the git revision), fails against a base whose BLEU is higher than the
tolerance allows, and the outputs round-trip through the default DVC remote in .dvc/config.
Works on whatever stages dvc.yaml has; the BLEU checks need the evaluate stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_PROFILE, copy_project, run, write_params
from nmt.config import merge, read_yaml

pytestmark = pytest.mark.slow

COPY = ["dvc.yaml", "pipelines", "src", "data/external", "tests/fixtures/tiny", ".dvcignore",
        "scripts/retrain.py"]
GITIGNORE = "mlflow.db\nmlflow.db-*\nmlruns/\nmlartifacts/\n__pycache__/\n/reports/ci/\n"
EVAL_METRICS = "reports/evaluate/metrics.json"
DVC = [sys.executable, "-m", "dvc"]


def stages(root: Path) -> list[str]:
    return list(yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"])


def reproduced(root: Path) -> list[str]:
    """Targets for `dvc push/pull/checkout` of what the baseline ran: evaluate and upstream.

    Export, when dvc.yaml has it, never runs here, so it has no outputs to transfer.
    """
    return ["evaluate", "--with-deps"] if "evaluate" in stages(root) else []


def make_project(root: Path) -> tuple[Path, dict[str, str]]:
    """A committed-nothing git + DVC copy whose params.yaml is the tiny profile.

    Uses the repository's .dvc/config, so the default remote is `<root>/../nmt-dvc-remote`.
    MLflow tracks into `<root>/mlflow.db`; git identity comes from the environment.
    """
    root.mkdir(parents=True)
    copy_project(root, COPY)
    write_params(root / "params.yaml", merge(read_yaml(REPO / "params.yaml"),
                                             read_yaml(TINY_PROFILE)))
    (root / ".gitignore").write_text(GITIGNORE, encoding="utf-8")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db", GX_ANALYTICS_ENABLED="false",
               # one torch thread per stage: on 2 shared cores the default (all cores)
               # oversubscribes and the tiny train step gets ~10x slower
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@localhost",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@localhost")
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT"):
        env.pop(var, None)
    run(["git", "init", "-q", "-b", "main"], root, env)
    run([*DVC, "init", "-q"], root, env)
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")
    return root, env


def commit_all(root: Path, env: dict[str, str], message: str) -> str:
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", message], root, env)
    return run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()


def commit_with_file(root: Path, env: dict[str, str], base: str, path: str, text: str) -> str:
    """A commit = `base` with one file replaced, made without touching the workspace."""
    index = dict(env, GIT_INDEX_FILE=str(root / ".git" / "test-index"))
    run(["git", "read-tree", base], root, index)
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=root, env=env, input=text,
                          capture_output=True, text=True, check=True).stdout.strip()
    run(["git", "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}"], root, index)
    tree = run(["git", "write-tree"], root, index).stdout.strip()
    return run(["git", "commit-tree", tree, "-p", base, "-m", f"fake {path}"], root,
               env).stdout.strip()


def retrain(root: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run the copied script; (exit code, summary text, combined output)."""
    proc = run([sys.executable, "scripts/retrain.py", *args], root, env, ok=False)
    summary = root / "reports" / "ci" / "summary.md"
    text = summary.read_text(encoding="utf-8") if summary.exists() else ""
    summary.unlink(missing_ok=True)
    return proc.returncode, text, proc.stdout[-6000:] + proc.stderr[-6000:]


_SHARED: dict[str, tuple[Path, dict[str, str], str]] = {}


def baseline_project(factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    """(root, env, baseline sha): the copy with its baseline reproduced and committed.

    Built once per session and shared with test_reproducibility.py (one tiny pipeline run
    less); HEAD is detached, as in CI. Tests may leave experiments applied in the workspace;
    the baseline commit and its DVC cache stay intact.
    """
    if "project" not in _SHARED:
        root, env = make_project(factory.mktemp("retrain") / "project")
        run([*DVC, "repro", *(["evaluate"] if "evaluate" in stages(root) else [])], root, env)
        baseline = commit_all(root, env, "baseline: tiny profile")
        run(["git", "checkout", "-q", "--detach"], root, env)
        _SHARED["project"] = (root, env, baseline)
    return _SHARED["project"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    return baseline_project(tmp_path_factory)


def test_summary_has_metrics_and_params_diff(project: tuple[Path, dict[str, str], str]) -> None:
    root, env, baseline = project
    names = stages(root)
    key, old, new = (("train.max_steps", 12, 6) if "train" in names
                     else ("vectorize.src_vocab_size", 200, 150))
    assert yaml.safe_load((root / "params.yaml").read_text())[key.split(".")[0]][
        key.split(".")[1]] == old
    rc, summary, out = retrain(root, env, "--base", baseline, "-S", f"{key}={new}", "--pull",
                               "--name", "exp-small", "--tolerance", "100")
    assert rc == 0, out
    gate = "PASS" if "evaluate" in names else "SKIPPED"
    assert f"**BLEU gate: {gate}**" in summary, summary
    assert f"### Metrics diff (`dvc metrics diff {baseline} --md`)" in summary
    assert "| Path " in summary and "| Metric " in summary and "| Change " in summary
    assert "| Param " in summary
    row = next(line for line in summary.splitlines() if f"| {key} " in line)
    assert f"| {old} " in row and f"| {new} " in row, row
    assert "dvc pull" in summary  # the remote folder does not exist yet: tolerated
    shown = run([*DVC, "exp", "show", "--md", "--no-pager"], root, env).stdout
    assert "exp-small" in shown


def test_mlflow_run_carries_experiment_name_and_revision(
        project: tuple[Path, dict[str, str], str]) -> None:
    root, env, baseline = project
    if "train" not in stages(root):
        pytest.skip("dvc.yaml has no train stage yet")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = yaml.safe_load((root / "params.yaml").read_text())["tracking"]["experiment"]
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], "tags.dvc_exp_name = 'exp-small'")
    assert len(runs) == 1, [r.data.tags.get("dvc_exp_name") for r in runs]
    tags = runs[0].data.tags
    assert tags["git_commit"] == baseline and tags["mlflow.runName"] == "exp-small"
    assert tags.get("dvc_exp_baseline_rev") == baseline
    if "evaluate" in stages(root):  # same numbers in `dvc exp show` (workspace) and MLflow
        bleu = json.loads((root / EVAL_METRICS).read_text())["test/bleu"]
        assert runs[0].data.metrics["test/bleu"] == pytest.approx(bleu)


def test_gate_fails_when_bleu_dropped(project: tuple[Path, dict[str, str], str]) -> None:
    root, env, baseline = project
    if "evaluate" not in stages(root):
        pytest.skip("dvc.yaml has no evaluate stage yet")
    metrics = json.loads((root / EVAL_METRICS).read_text(encoding="utf-8"))
    metrics["test/bleu"] += 5.0  # a base 5 BLEU better than the workspace
    fake = commit_with_file(root, env, baseline, EVAL_METRICS, json.dumps(metrics, indent=2))
    rc, summary, out = retrain(root, env, "--base", fake, "--name", "exp-gate")
    assert rc == 1, out
    assert "**BLEU gate: FAIL**" in summary and "a drop of more than 1.00 fails" in summary
    assert "| test/bleu " in summary


def test_push_pull_round_trip_through_the_default_remote(
        project: tuple[Path, dict[str, str], str]) -> None:
    root, env, _ = project
    remote = root.parent / "nmt-dvc-remote"  # .dvc/config: url = ../../nmt-dvc-remote
    assert "(default)" in run([*DVC, "remote", "list"], root, env).stdout
    run([*DVC, "push", *reproduced(root)], root, env)
    assert remote.is_dir() and any(remote.rglob("*"))
    train = (root / "data/processed/train.parquet").read_bytes()
    cache, kept = root / ".dvc" / "cache", root / ".dvc" / "cache.kept"
    cache.rename(kept)  # keep the baseline's cache for test_reproducibility.py
    try:
        shutil.rmtree(root / "data" / "processed")
        run([*DVC, "pull", *reproduced(root)], root, env)
        assert (root / "data/processed/train.parquet").read_bytes() == train
        assert "up to date" in run([*DVC, "status", *reproduced(root)], root, env).stdout
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        kept.rename(cache)
