"""The MLflow pyfunc of the export: build it in a temporary folder, check it, hash its content."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import nmt
from nmt.checkpoint import ModelDir
from nmt.config import ModelConfig
from nmt.evaluation import TUTORIAL_EXAMPLES
from nmt.export.errors import ExportError
from nmt.serving import model_code, write_artifacts
from nmt.translator import Translator

# What the pyfunc imports (nmt.translator pulls in lightning through nmt.data.datamodule).
SERVING_DISTRIBUTIONS = ("mlflow", "torch", "lightning", "sentencepiece", "safetensors", "numpy",
                         "pandas", "pyarrow", "PyYAML", "pydantic")


def pip_requirements() -> list[str]:
    """Exact pins of the serving dependencies, from the installed versions (local tags dropped)."""
    return [f"{dist}=={metadata.version(dist).split('+')[0]}" for dist in SERVING_DISTRIBUTIONS]


def _package_copy(dest: Path) -> Path:
    """A copy of the `nmt` package without caches, for the pyfunc's `code_paths`."""
    src = Path(nmt.__file__).parent
    shutil.copytree(src, dest / "nmt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest / "nmt"


@dataclass(frozen=True)
class PyfuncSpec:
    """Everything `mlflow.pyfunc.save_model` / `log_model` need, built in a temporary folder."""

    python_model: str
    artifacts: dict[str, str]
    code_paths: list[str]
    input_example: tuple[list[str], dict[str, int]]
    pip_requirements: list[str]

    def kwargs(self) -> dict:
        return {"python_model": self.python_model, "artifacts": self.artifacts,
                "code_paths": self.code_paths, "input_example": self.input_example,
                "pip_requirements": self.pip_requirements}


def build_pyfunc_spec(translator: Translator, model_cfg: ModelConfig, model_dir: Path,
                      attribution: Path, work: Path) -> PyfuncSpec:
    """Write the model-code file, the artifacts and the package copy into `work`."""
    (work / "model_code.py").write_text(model_code(), encoding="utf-8")
    artifacts = write_artifacts(work / "artifacts", translator.model, model_cfg,
                                ModelDir(model_dir).tokenizers_dir, translator.search,
                                translator.max_src_tokens, attribution, translator.shortlist)
    s = translator.search
    example = (list(TUTORIAL_EXAMPLES), {"beam_size": s.beam_size, "nbest": 1,
                                         "batch_size": s.batch_size})
    return PyfuncSpec(str(work / "model_code.py"), artifacts, [str(_package_copy(work / "code"))],
                      example, pip_requirements())


def validate_pyfunc(spec: PyfuncSpec, work: Path) -> list[str]:
    """Save the pyfunc locally, load it back, translate the tutorial's examples."""
    import mlflow

    path = work / "pyfunc"
    mlflow.pyfunc.save_model(path=str(path), **spec.kwargs())
    loaded = mlflow.pyfunc.load_model(str(path))
    out = loaded.predict(list(TUTORIAL_EXAMPLES))
    texts = [o.translation for o in out]
    if len(texts) != len(TUTORIAL_EXAMPLES) or not all(isinstance(t, str) and t for t in texts):
        raise ExportError(f"the pyfunc returned {texts!r} for {list(TUTORIAL_EXAMPLES)!r}; "
                          "expected one non-empty translation each")
    if loaded.metadata.get_params_schema() is None:
        raise ExportError("the pyfunc signature has no params schema")
    return texts


def content_sha256(spec: PyfuncSpec) -> str:
    """sha256 over everything the pyfunc ships: model code, artifacts, `nmt` code, pins.

    Equal hashes mean an identical served model (same weights, search defaults, tokenizers and
    code), which `nmt.registry.find_registered` uses to avoid registering duplicates.
    """
    digest = hashlib.sha256()
    roots = [Path(spec.python_model), *map(Path, spec.artifacts.values()), *map(Path,
                                                                              spec.code_paths)]
    for root in roots:
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            digest.update(f"{f.relative_to(root.parent).as_posix()}\0".encode())
            digest.update(f.read_bytes())
    digest.update("\n".join(spec.pip_requirements).encode())
    return digest.hexdigest()
