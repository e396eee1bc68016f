"""Export stage on the tiny model: registration, promotion gate, rollback, failed exports.

`export_once` runs the stage once per session into its own SQLite store (a copy of the tiny
model with a fresh run, test/bleu 20.0 in its metrics file); the serving and CLI tests reuse it.
Gate tests register that logged model under other names, so `fra-eng-translator` keeps exactly
one version (champion) for the other tests.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pipelines.export as export_stage
import pytest
from mlflow import MlflowClient

from conftest import REPO, tiny_raw, write_params
from nmt import registry, tracking
from nmt.checkpoint import ModelDir, load_model
from nmt.config import load_params
from nmt.evaluation import TUTORIAL_EXAMPLES
from nmt.export import stage as export_lib
from nmt.shortlist import Shortlist
from nmt.translator import Translator

NAME = "fra-eng-translator"
TEST_BLEU = 20.0


def stage_args(paths: dict, **over: str) -> list[str]:
    args = {"--params": paths["params"], "--model-dir": paths["model_dir"],
            "--eval-metrics": paths["metrics"], "--test-data": paths["test_data"],
            "--attribution": str(REPO / "data/external/ATTRIBUTION.md"),
            "--out-dir": paths["export_dir"], "--reports": paths["reports"]} | over
    return [str(x) for kv in args.items() for x in kv]


def export_once(tiny_trained: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the export stage once per session (cached on disk); returns its paths as strings."""
    root = tmp_path_factory.getbasetemp() / "tiny_export"
    done = root / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(tiny_trained["model_dir"], root / "models",
                    ignore=shutil.ignore_patterns("checkpoints"))
    uri = f"sqlite:///{(root / 'mlflow.db').as_posix()}"
    paths = {"root": str(root), "uri": uri, "model_dir": str(root / "models"),
             "params": str(write_params(root / "params.yaml",
                                        tiny_raw(tracking={"tracking_uri": uri}))),
             "metrics": str(root / "reports/evaluate/metrics.json"),
             "test_data": str(Path(tiny_trained["processed"]) / "test.parquet"),
             "export_dir": str(root / "models/export"), "reports": str(root / "reports/export")}
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        ref = tracking.start_run(load_params(paths["params"]), root, {"purpose": "export test"})
        tracking.end_run(ref, "FINISHED")
        tracking.write_run_json(root / "models/run.json", ref)
        Path(paths["metrics"]).parent.mkdir(parents=True)
        Path(paths["metrics"]).write_text(json.dumps({"test/bleu": TEST_BLEU}))
        assert export_stage.main(stage_args(paths)) == 0
    finally:
        mlflow.set_tracking_uri(None)  # tracking.open_run set it globally
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    paths["run_id"] = ref.run_id
    done.write_text(json.dumps(paths))
    return paths


@pytest.fixture()
def exported(tiny_trained: dict, tmp_path_factory: pytest.TempPathFactory,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """The session's export, with MLflow pointed at its store for this test only."""
    paths = export_once(tiny_trained, tmp_path_factory)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", paths["uri"])
    mlflow.set_tracking_uri(paths["uri"])
    yield paths
    mlflow.set_tracking_uri(None)  # back to MLFLOW_TRACKING_URI / default


def logged_models(paths: dict) -> list[str]:
    """Ids of the logged models of the export run."""
    ref = tracking.read_run_json(Path(paths["model_dir"]) / "run.json")
    models = MlflowClient(paths["uri"]).search_logged_models([ref.experiment_id])
    return sorted(m.model_id for m in models if m.source_run_id == ref.run_id)


def snapshot(client: MlflowClient, name: str) -> dict:
    """Versions with tags, and aliases, of a registered model (None when it does not exist)."""
    try:
        aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    except mlflow.exceptions.MlflowException:
        return {"model": None}
    versions = {v.version: dict(v.tags) for v in client.search_model_versions(f"name='{name}'")}
    return {"model": name, "aliases": aliases, "versions": versions}


def test_export_registers_first_version_as_champion(exported: dict) -> None:
    client = MlflowClient(exported["uri"])
    promotion = json.loads((Path(exported["reports"]) / "promotion.json").read_text())
    assert (promotion["decision"], promotion["version"]) == ("promoted", "1")
    assert promotion["champion_bleu_before"] is None and promotion["test_bleu"] == TEST_BLEU
    assert json.loads((Path(exported["reports"]) / "parity.json").read_text())["passed"]
    assert snapshot(client, NAME)["aliases"] == {"candidate": "1", "champion": "1"}
    mv = client.get_model_version(NAME, "1")
    assert mv.run_id == exported["run_id"]
    assert {k: mv.tags[k] for k in ("test_bleu", "promotion", "champion_bleu_before")} == {
        "test_bleu": "20.0", "promotion": "promoted", "champion_bleu_before": "none"}
    assert sorted(p.name for p in Path(exported["export_dir"]).iterdir()) == [
        "ATTRIBUTION.md", "decoder_step.pt2", "encoder.pt2", "nmt_portable", "runner.json",
        "tokenizers", "translate.py"]


def test_registered_pyfunc_is_pickle_free_pinned_and_translates(exported: dict,
                                                                tmp_path: Path) -> None:
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion",
                                                     dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".ckpt"))]
    assert {"artifacts/weights.safetensors", "artifacts/ATTRIBUTION.md", "artifacts/serving.json",
            "artifacts/tokenizers/meta.json", "artifacts/shortlist.npz",
            "code/nmt/serving.py", "code/nmt/shortlist.py"} <= files
    requirements = (local / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in requirements and all("==" in r for r in requirements)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert [p.name for p in model.metadata.get_params_schema().params] == [
        "beam_size", "nbest", "batch_size"]
    out = model.predict(list(TUTORIAL_EXAMPLES), params={"beam_size": 2, "nbest": 2})
    assert all(o.translation and len(o.nbest) == 2 for o in out)


def test_identical_model_is_found_instead_of_registered_again(exported: dict) -> None:
    client = MlflowClient(exported["uri"])
    sha = client.get_model_version(NAME, "1").tags["content_sha256"]
    assert registry.find_registered(client, NAME, sha) == "1"
    assert registry.find_registered(client, NAME, "0" * 64) is None


def test_export_of_an_identical_model_registers_nothing(exported: dict) -> None:
    """What `dvc repro -f export` does on unchanged inputs: re-use version 1."""
    client = MlflowClient(exported["uri"])
    before = snapshot(client, NAME)
    params = load_params(exported["params"])
    model_dir = Path(exported["model_dir"])
    folder = ModelDir(model_dir)
    model, src_tok, trg_tok, model_params = load_model(model_dir)
    translator = Translator(model, src_tok, trg_tok, params.evaluate.search,
                            model_params.vectorize.max_src_tokens,
                            Shortlist.load(folder.shortlist_file)  # as the stage does
                            if folder.has_shortlist() else None)
    promotion, _ = export_lib.publish(
        params, translator, model_params.model, model_dir, REPO / "data/external/ATTRIBUTION.md",
        tracking.read_run_json(model_dir / "run.json"), TEST_BLEU)
    assert (promotion.decision, promotion.version, promotion.champion_version) == (
        "unchanged", "1", "1")
    assert snapshot(client, NAME) == before


def _register(client: MlflowClient, exported: dict, name: str, bleu: float,
              margin: float = 0.5) -> registry.Promotion:
    uri = client.get_model_version(NAME, "1").tags["logged_model_uri"]
    return registry.register_and_promote(client, name, uri, exported["run_id"], bleu, margin)


def test_gate_sequence(exported: dict) -> None:
    client, name = MlflowClient(exported["uri"]), "gate-sequence"
    steps = [(20.0, "promoted", "1", "none"), (19.0, "kept", "1", "20.0"),
             (20.3, "kept", "1", "20.0"), (20.6, "promoted", "4", "20.0"),
             (30.0, "promoted", "5", "20.6")]
    for version, (bleu, decision, champion, before) in enumerate(steps, start=1):
        promotion = _register(client, exported, name, bleu)
        assert (promotion.version, promotion.decision) == (str(version), decision)
        aliases = snapshot(client, name)["aliases"]
        assert aliases == {"candidate": str(version), "champion": champion}
        tags = client.get_model_version(name, str(version)).tags
        assert (tags["promotion"], tags["champion_bleu_before"]) == (decision, before)
        assert float(tags["test_bleu"]) == bleu


@pytest.mark.parametrize("order", [(25.0, 5.0), (5.0, 25.0)])
def test_better_model_is_champion_whatever_the_order(exported: dict,
                                                     order: tuple[float, float]) -> None:
    client, name = MlflowClient(exported["uri"]), f"gate-order-{int(order[0])}"
    versions = {bleu: _register(client, exported, name, bleu).version for bleu in order}
    assert snapshot(client, name)["aliases"]["champion"] == versions[25.0]


@pytest.mark.parametrize("existing", [True, False])
def test_failed_registration_is_rolled_back(exported: dict, monkeypatch: pytest.MonkeyPatch,
                                            existing: bool) -> None:
    client, name = MlflowClient(exported["uri"]), f"gate-rollback-{existing}"
    if existing:
        _register(client, exported, name, 10.0)
        _register(client, exported, name, 9.0)  # candidate 2, champion 1
    before = snapshot(client, name)
    real = MlflowClient.set_registered_model_alias

    def failing(self: MlflowClient, model: str, alias: str, version: str) -> None:
        if alias == "champion":
            raise mlflow.exceptions.MlflowException("injected failure")
        real(self, model, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", failing)
    with pytest.raises(mlflow.exceptions.MlflowException, match="injected"):
        _register(client, exported, name, 50.0)
    monkeypatch.undo()
    assert snapshot(client, name) == before


def test_failed_parity_leaves_registry_and_outputs_unchanged(
        exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A portable export that decodes differently (length cap changed) fails before MLflow."""
    client = MlflowClient(exported["uri"])
    before = snapshot(client, NAME)
    run_models = logged_models(exported)

    def broken_portable(model, model_dir, search, max_src_tokens, attribution, out_dir):
        shutil.copytree(exported["export_dir"], out_dir, dirs_exist_ok=True)
        cfg = json.loads((out_dir / "runner.json").read_text())
        (out_dir / "runner.json").write_text(json.dumps(cfg | {"max_len_offset": 1}))

    monkeypatch.setattr(export_lib, "write_portable", broken_portable)
    params = write_params(tmp_path / "params.yaml", tiny_raw(
        tracking={"tracking_uri": exported["uri"]}, export={"parity_sentences": 4}))
    out_dir, reports = tmp_path / "export", tmp_path / "reports"
    rc = export_stage.main(stage_args(exported, **{"--params": str(params),
                                                   "--out-dir": str(out_dir),
                                                   "--reports": str(reports)}))
    assert rc == 1
    assert not out_dir.exists()
    promotion = json.loads((reports / "promotion.json").read_text())
    assert promotion["decision"] == "failed"
    assert "differs from the eager model" in promotion["reason"]
    parity = json.loads((reports / "parity.json").read_text())
    assert not parity["passed"] and parity["greedy_mismatches"] == 4
    assert snapshot(client, NAME) == before
    assert logged_models(exported) == run_models and len(run_models) == 1


def test_report_from_another_model_is_refused(exported: dict, tmp_path: Path) -> None:
    client = MlflowClient(exported["uri"])
    ref = tracking.read_run_json(Path(exported["model_dir"]) / "run.json")
    other = tracking.RunRef(client.create_run(ref.experiment_id).info.run_id, ref.experiment_id,
                            ref.tracking_uri, ref.experiment)
    tracking.log_metrics(other, {"test/bleu": 7.5})
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"test/bleu": TEST_BLEU}))
    with pytest.raises(export_lib.ExportError, match="belongs to another model"):
        export_lib.read_test_bleu(metrics, other)
    metrics.write_text(json.dumps({"test/chrf": 1.0}))
    with pytest.raises(export_lib.ExportError, match="test/bleu missing"):
        export_lib.read_test_bleu(metrics, ref)


def test_untagged_champion_stops_the_gate_with_registry_error(exported: dict) -> None:
    """A champion without a test_bleu tag (moved by hand) cannot be compared: nothing changes."""
    client, name = MlflowClient(exported["uri"]), "gate-untagged"
    _register(client, exported, name, 10.0)
    client.delete_model_version_tag(name, "1", "test_bleu")
    before = snapshot(client, name)
    with pytest.raises(registry.RegistryError, match="version 1 \\(champion\\) has no test_bleu"):
        _register(client, exported, name, 50.0)
    assert snapshot(client, name) == before
