"""nmt.tracking: where runs go (DVC temporary clones), experiment creation races, retry bounds."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from nmt import tracking
from nmt.config import TrackingConfig


def test_main_repo_root_of_a_dvc_temporary_clone(tmp_path: Path) -> None:
    clone = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpa1b2c3"
    clone.mkdir(parents=True)
    assert tracking.main_repo_root(clone) == (tmp_path / "repo").resolve()
    assert tracking.main_repo_root(clone / "sub") == (tmp_path / "repo").resolve()
    assert tracking.main_repo_root(tmp_path / "repo") == (tmp_path / "repo").resolve()
    # a folder merely named like DVC's is not a temporary clone
    other = tmp_path / "exps" / "tmpa1b2c3"
    assert tracking.main_repo_root(other) == other.resolve()


def test_relative_sqlite_store_of_a_queued_experiment_is_the_main_repos(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc exp run --queue/--temp` runs in .dvc/tmp/exps/<tmp>, which DVC deletes afterwards."""
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    cfg = TrackingConfig(tracking_uri="sqlite:///mlflow.db", experiment="e")
    clone = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpq"
    clone.mkdir(parents=True)
    expected = f"sqlite:///{(tmp_path / 'repo').resolve().as_posix()}/mlflow.db"
    assert tracking.resolve_tracking_uri(cfg, clone) == expected
    assert tracking.resolve_tracking_uri(cfg, tmp_path / "repo") == expected
    absolute = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/elsewhere.db", experiment="e")
    assert tracking.resolve_tracking_uri(absolute, clone) == f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv(tracking.ENV_URI, "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(cfg, clone) == "http://127.0.0.1:5000"


def test_experiment_created_by_a_parallel_run_is_reused(tmp_path: Path) -> None:
    """Two runs that both find no experiment race to create it: the loser uses the winner's."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    winner = MlflowClient(uri)

    class LateClient(MlflowClient):
        """Looks the experiment up just before the parallel run creates it."""

        looked_up = 0

        def get_experiment_by_name(self, name: str):  # type: ignore[no-untyped-def]
            LateClient.looked_up += 1
            if LateClient.looked_up == 1:
                winner.create_experiment(name)  # the other run wins the race here
                return None
            return super().get_experiment_by_name(name)

    exp_id = tracking._experiment_id(LateClient(uri), "race", tmp_path, uri)
    assert exp_id == winner.get_experiment_by_name("race").experiment_id
    assert LateClient.looked_up == 2
    assert len(winner.search_experiments(filter_string="name = 'race'")) == 1


def test_new_experiment_artifacts_go_to_the_main_repo(tmp_path: Path) -> None:
    clone = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpz"
    clone.mkdir(parents=True)
    uri = f"sqlite:///{tmp_path}/repo/mlflow.db"
    client = MlflowClient(uri)
    exp_id = tracking._experiment_id(client, "queued", clone, uri)
    location = client.get_experiment(exp_id).artifact_location
    assert location == (tmp_path / "repo").resolve().joinpath("mlruns", "queued").as_uri()


def test_http_retries_are_bounded_unless_the_environment_says_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key in tracking.HTTP_RETRY_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    assert tracking.bound_http_retries() == tracking.HTTP_RETRY_DEFAULTS
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2  # what MLflow's client will use
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 30
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    assert tracking.bound_http_retries()["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 5


def test_runs_started_after_the_same_seed_get_different_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_params) -> None:
    import random

    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    params = dataclasses.replace(tiny_params, tracking=TrackingConfig(uri, "names"))
    names = []
    for _ in range(2):
        random.seed(1234)  # what L.seed_everything does before the train stage starts its run
        ref = tracking.start_run(params, tmp_path, tracking.run_tags(tmp_path, tmp_path))
        names.append(MlflowClient(uri).get_run(ref.run_id).info.run_name)
    assert names[0] != names[1]
    assert all(re.fullmatch(r"train-\d{8}-\d{6}-[0-9a-f]{4}", n) for n in names), names
    named = tracking.start_run(params, tmp_path, {"mlflow.runName": "lr-0.002"})
    assert MlflowClient(uri).get_run(named.run_id).info.run_name == "lr-0.002"


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        return model_input


def test_metrics_logged_again_show_the_newest_and_a_model_can_still_be_logged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_params) -> None:
    """evaluate re-run on the same training run, then export logs a model from that run."""
    import time

    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    params = dataclasses.replace(tiny_params, tracking=TrackingConfig(uri, "again"))
    ref = tracking.start_run(params, tmp_path, {})
    tracking.log_metrics(ref, {"test/bleu": 1.0, "test/sentences_per_s": 100.0})
    time.sleep(0.01)
    tracking.log_metrics(ref, {"test/bleu": 1.0, "test/sentences_per_s": 150.0})
    client = MlflowClient(uri)
    assert client.get_run(ref.run_id).data.metrics["test/sentences_per_s"] == 150.0
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=ref.run_id):
            info = mlflow.pyfunc.log_model(name="echo", python_model=_Echo())
    finally:
        mlflow.set_tracking_uri(None)
    assert info.run_id == ref.run_id
