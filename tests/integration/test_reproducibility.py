"""Same params and seed on CPU give the same model and metrics (tiny profile, real `dvc repro`).

tests/integration/test_dvc_pipeline.py already shows that the data stages (validate, vectorize)
rebuild byte-identical outputs and that `dvc repro` is then a no-op. This extends it to the
model: `train` and `evaluate` forced to run again (new processes, a new MLflow run) in the git +
DVC copy of test_retrain.py, whose committed baseline is the first run, must give the same
weights and the same metrics, timing keys aside.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_retrain import DVC, baseline_project, reproduced, run, stages

pytestmark = pytest.mark.slow

MODEL_STAGES = ("train", "evaluate")
TIMING = re.compile(r"(wall_s|decode_s|_per_s)(_\w+)?$")  # wall clock and throughput keys
WEIGHT_SUFFIXES = (".pt", ".safetensors")


def stage_files(root: Path, stage: str, kind: str) -> list[Path]:
    """Paths a stage declares under `outs` or `metrics` in dvc.yaml."""
    entries = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]
    return [root / (next(iter(e)) if isinstance(e, dict) else e) for e in entries.get(kind, [])]


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not TIMING.search(k)}


def load_weights(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensor {where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"keys of {where} differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where} differs"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def snapshot(root: Path, names: list[str], keep: Path) -> tuple[dict, dict]:
    """(JSON metrics of the stages, copies of the train stage's weight files) after a run."""
    metrics = {str(p.relative_to(root)): json.loads(p.read_text(encoding="utf-8"))
               for stage in names for p in stage_files(root, stage, "metrics")
               if p.suffix == ".json"}  # plots-like CSVs and folders are listed there too
    weights = {}
    for out in stage_files(root, "train", "outs"):
        files = sorted(out.rglob("*")) if out.is_dir() else [out]
        for path in files:
            if path.suffix in WEIGHT_SUFFIXES:
                copy = keep / path.relative_to(root)
                copy.parent.mkdir(parents=True, exist_ok=True)
                weights[str(path.relative_to(root))] = Path(shutil.copy2(path, copy))
    return metrics, weights


def test_forced_rerun_gives_identical_model_and_metrics(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    root, env, baseline = baseline_project(tmp_path_factory)
    names = [s for s in MODEL_STAGES if s in stages(root)]
    if "train" not in names:
        pytest.skip("dvc.yaml has no train stage yet")
    # Back to the committed baseline run (other tests may have applied experiments).
    run(["git", "checkout", "-q", "-f", "--detach", baseline], root, env)
    run([*DVC, "checkout", "--force", *reproduced(root)], root, env)
    first, first_weights = snapshot(root, names, tmp_path / "first")
    run([*DVC, "repro", "--force", "--single-item", *names], root, env)
    second, second_weights = snapshot(root, names, tmp_path / "second")

    assert first, "the train/evaluate stages declare no metrics"
    assert first.keys() == second.keys()
    for path in first:
        assert without_timing(first[path]) == without_timing(second[path]), path
    assert first_weights, "no weights (*.pt, *.safetensors) among the train outputs"
    assert first_weights.keys() == second_weights.keys()
    for rel, path in first_weights.items():
        assert_same(load_weights(path), load_weights(second_weights[rel]), rel)
    assert "up to date" in run([*DVC, "status", *reproduced(root)], root, env).stdout
