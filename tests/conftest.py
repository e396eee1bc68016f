"""Shared fixtures: the tiny profile, its params file, and the data stages run once on it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from nmt.config import Params, merge, parse_params, read_yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
TINY_PROFILE = FIXTURES / "params_tiny.yaml"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--model-dir", default=None,
                     help="trained model folder for the opt-in behavioural tests (marker: model)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_model = pytest.mark.skip(reason="needs --model-dir with a trained model")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "model" in item.keywords and not config.getoption("--model-dir"):
            item.add_marker(skip_model)


def require_system(missing: str | None, install: str) -> None:
    """Skip a test whose system requirement is `missing`, or fail it when `CI` is set.

    Args:
        missing: what is not there (e.g. "PostgreSQL server binaries (initdb, pg_ctl)"), or None.
        install: the command that installs it (the README's quick start lists them all).
    """
    if missing is None:
        return
    reason = f"{missing} not found; install with: {install} (README, Quickstart)"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI is set, so this must run: {reason}")
    pytest.skip(reason)


def tiny_raw(**overrides: object) -> dict:
    """params.yaml merged with the tiny profile, then with `overrides` (nested dicts)."""
    raw = merge(read_yaml(REPO / "params.yaml"), read_yaml(TINY_PROFILE))
    raw["download"]["bundled"] = str(REPO / raw["download"]["bundled"])
    return merge(raw, overrides) if overrides else raw


def copy_project(root: Path, paths: list[str]) -> None:
    """Copy `paths` (files or folders, relative to the repository) into `root`, skipping caches."""
    for rel in paths:
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, root / rel, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)


def run(args: list[str], cwd: Path, env: dict[str, str], ok: bool = True,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run a command (git, dvc, a stage) in a project copy; with `ok`, assert it exited 0."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, (f"{args} exited {proc.returncode}:\n"
                                      f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_params(path: Path, raw: dict) -> Path:
    """Write a full params file (what DVC and the stage scripts read)."""
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids hand-off stalls on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture()
def tiny_params() -> Params:
    return parse_params(tiny_raw())


@pytest.fixture()
def tiny_params_file(tmp_path: Path) -> Path:
    return write_params(tmp_path / "params.yaml", tiny_raw())


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """download -> validate -> vectorize on the tiny corpus, once per test session.

    Returns the paths of every output; tests must not modify them (copy first).
    """
    import pipelines.download as download
    import pipelines.validate as validate
    import pipelines.vectorize as vectorize

    root = tmp_path_factory.mktemp("tiny_data")
    params = write_params(root / "params.yaml", tiny_raw())
    paths = {"params": params, "archive": root / "data/raw/fra-eng.zip",
             "pairs": root / "data/interim/pairs.parquet", "processed": root / "data/processed",
             "reports": root / "reports"}
    assert download.main(["--params", str(params), "--out", str(paths["archive"])]) == 0
    assert validate.main(["--params", str(params), "--archive", str(paths["archive"]),
                          "--out", str(paths["pairs"]),
                          "--reports", str(paths["reports"] / "validation")]) == 0
    assert vectorize.main(["--params", str(params), "--pairs", str(paths["pairs"]),
                           "--out-dir", str(paths["processed"]),
                           "--stats", str(paths["reports"] / "vectorize/stats.json")]) == 0
    return paths


# ---------------------------------------------------------------------------------------------
# tiny_trained: the train and shortlist stages run once per session on `tiny_data` (evaluate and
# export reuse them)
@pytest.fixture(scope="session")
def tiny_trained(tiny_data: dict[str, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """Train the tiny profile once into a temporary folder with its own SQLite MLflow store.

    Returns paths `model_dir`, `processed`, `reports`, `params` (the params file used) and the
    string `tracking_uri`. MLFLOW_TRACKING_URI is set only while training, then restored. Tests
    must not modify these (copy `model_dir` first); logging more into its run is fine.
    """
    import os

    import pipelines.train as train_stage
    import torch

    root = tmp_path_factory.mktemp("tiny_trained")
    uri = f"sqlite:///{(root / 'mlflow.db').as_posix()}"
    paths: dict[str, Path | str] = {
        "params": write_params(root / "params.yaml", tiny_raw(tracking={"tracking_uri": uri})),
        "model_dir": root / "models", "processed": tiny_data["processed"],
        "reports": root / "reports", "tracking_uri": uri}
    saved, threads = os.environ.get("MLFLOW_TRACKING_URI"), torch.get_num_threads()
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the env var wins over params: point it here too
    torch.set_num_threads(1)  # tiny tensors: one thread avoids stalls on a busy 2-core machine
    try:
        rc = train_stage.main(["--params", str(paths["params"]),
                               "--processed", str(paths["processed"]),
                               "--model-dir", str(paths["model_dir"]),
                               "--reports", str(Path(paths["reports"]) / "train")])
    finally:
        torch.set_num_threads(threads)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    assert rc == 0, "train stage failed on the tiny profile"
    import pipelines.shortlist as shortlist_stage

    assert shortlist_stage.main(["--params", str(paths["params"]),
                                 "--processed", str(paths["processed"]),
                                 "--out", str(Path(paths["model_dir"]) / "shortlist.npz")]) == 0
    return paths


# ---------------------------------------------------------------------------------------------
# the CPU's bf16 units, faked absent or present (nmt.precision reads them for training and
# decoding)
@pytest.fixture()
def no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    import nmt.precision

    monkeypatch.setattr(nmt.precision, "cpu_bf16_flags", lambda: [])


@pytest.fixture()
def amx(monkeypatch: pytest.MonkeyPatch) -> None:
    import nmt.precision

    monkeypatch.setattr(nmt.precision, "cpu_bf16_flags", lambda: ["amx_bf16", "avx512_bf16"])


@pytest.fixture()
def restore_serve_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`nmt serve` (`nmt.rest.serve_threads`) sets OMP_NUM_THREADS and this process's torch
    threads: start without the variable, and put both back afterwards."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# tiny_compiled: a random 2-layer Transformer with char tokenizers and its decoder step compiled
# once per session (nmt.compiled_step; ~20 s of C++ build); the serving test reuses the cache
@pytest.fixture(scope="session")
def tiny_compiled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Keys: `model` (eager, eval), `compiled` (`CompiledTransformer`), `cache` (its cache
    folder), `model_dir` (tokenizers/ inside), `src_tok`, `trg_tok`, `cfg` (`ModelConfig`)."""
    from factories import tiny_model_cfg, tiny_transformer_cfg
    from nmt.compiled_step import CompiledTransformer
    from nmt.data.vocab import CharTokenizer, save_tokenizers
    from nmt.model import build_model

    require_system(None if shutil.which("g++") or shutil.which("c++") else
                   "a C++ compiler (g++), which `nmt serve --compile` builds its programs with",
                   "sudo apt-get install -y g++")
    root = tmp_path_factory.mktemp("tiny_compiled")
    src_tok = CharTokenizer.train(["Be nice.", "Drop it!", "Get out!", "Tom ate an apple."])
    trg_tok = CharTokenizer.train(["Sois gentil.", "Laisse tomber !", "Dehors !"])
    save_tokenizers(root / "model" / "tokenizers", src_tok, trg_tok)
    cfg = tiny_model_cfg(arch="transformer",
                         transformer=tiny_transformer_cfg(layers=2, max_positions=48))
    torch.manual_seed(0)
    model = build_model(cfg, src_tok.vocab_size, trg_tok.vocab_size).eval()
    compiled = CompiledTransformer.build(model, root / "cache")
    assert compiled is not None, "the decoder step did not compile (see the warning above)"
    return {"model": model, "compiled": compiled, "cache": root / "cache",
            "model_dir": root / "model", "src_tok": src_tok, "trg_tok": trg_tok, "cfg": cfg}


@pytest.fixture(scope="session")
def tiny_compiled_bf16(tiny_compiled: dict) -> dict:
    """`tiny_compiled`'s model compiled for bf16 decoding into the same cache (~30 s more):
    keys `compiled` (`CompiledTransformer`, bf16) and `model` (the plain bf16 copy it runs)."""
    from nmt.compiled_step import CompiledTransformer

    compiled = CompiledTransformer.build(tiny_compiled["model"], tiny_compiled["cache"], "bf16")
    assert compiled is not None, "the bf16 programs did not compile (see the warning above)"
    return {"compiled": compiled, "model": compiled.model}
