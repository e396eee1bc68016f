"""GPU check: the real train stage code (`nmt.training.train`) with the GPU profile, then test
BLEU, the three tutorial examples and `bench/decode_throughput.py`'s modes on the GPU.

Written for the lent GPU machine of this workplace, which has torch but neither MLflow, pandas,
pyarrow, lightning nor sacrebleu, and no network. So, unlike the product:
- tracking is replaced by an in-process stand-in for `nmt.tracking` (metrics kept in memory,
  Lightning's CSVLogger instead of MLflow's);
- the splits come from an npz + JSON copy of data/processed (pandas/pyarrow are stubbed);
- lightning, sacrebleu and their pure-Python deps are installed from carried wheels.
Prepare the carry folder (default `.gpu/`, git-ignored; `GPU_CARRY` overrides) on a dev box:
    wheels/     pip download --no-deps --only-binary=:all: --python-version 3.12 lightning
                lightning-utilities sacrebleu portalocker tabulate colorama lxml
    splits.npz  per split: <split>_src / _trg (flat int16 ids), _src_len / _trg_len, _group
    <split>_text.json  {"en": [...], "fr": [...]}
    tokenizers/ copy of data/processed/tokenizers
then run `OUT=<folder> GPU_MINUTES=5 python3 bench/gpu_check.py` there (`GPU_ARCH=transformer`
for the Transformer profile, reports/gpu/params_gpu_transformer.yaml); it writes
<OUT>/gpu_check.json, <OUT>/reports/ (history.csv, metrics.json, samples.md). `GPU_DRYRUN=1`
checks the plumbing on a CPU with a tiny model. Results: reports/gpu/.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = Path(os.environ.get("GPU_CARRY", REPO / ".gpu")).resolve()
OUT = Path(os.environ.get("OUT", "/tmp/out"))
OUT.mkdir(parents=True, exist_ok=True)
RESULT: dict = {}


def save() -> None:
    (OUT / "gpu_check.json").write_text(json.dumps(RESULT, indent=2, default=str))


def phase(name):
    def deco(fn):
        def run(*a, **k):
            t = time.time()
            try:
                value = fn(*a, **k)
                RESULT[name] = {"ok": True, "seconds": round(time.time() - t, 1), **(value or {})}
            except BaseException as exc:  # keep going, record what broke
                RESULT[name] = {"ok": False, "seconds": round(time.time() - t, 1),
                                "error": repr(exc), "trace": traceback.format_exc()[-3000:]}
            save()
            print(name, json.dumps(RESULT[name], default=str)[:1500], flush=True)
        return run
    return deco


# ---------------------------------------------------------------- environment
site = Path("/tmp/site")
subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                "--target", str(site), *map(str, (HERE / "wheels").glob("*.whl"))], check=False)
sys.path.insert(0, str(site))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))
DRY = os.environ.get("GPU_DRYRUN") == "1"  # plumbing check on a CPU: shims forced, tiny run
for name in ("pandas", "pyarrow", "pyarrow.parquet"):
    try:
        if DRY:
            raise ImportError(name)
        __import__(name)
    except ImportError:
        import importlib.machinery
        shim = types.ModuleType(name)
        shim.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = shim
if "pyarrow" in sys.modules and not hasattr(sys.modules["pyarrow"], "__file__"):
    sys.modules["pyarrow"].parquet = sys.modules["pyarrow.parquet"]

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULT["env"] = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                 "python": sys.version.split()[0]}
save()

# a stand-in for nmt.tracking (MLflow is not installed there)
from dataclasses import dataclass  # noqa: E402

fake = types.ModuleType("nmt.tracking")
METRICS: list = []


@dataclass(frozen=True)
class RunRef:
    run_id: str
    experiment_id: str
    tracking_uri: str
    experiment: str


class TrackingError(RuntimeError):
    pass


def _lightning_logger(ref):
    from lightning.pytorch.loggers import CSVLogger
    return CSVLogger(save_dir=str(OUT / "csv"), name="gpu")


fake.__dict__.update(
    RunRef=RunRef, TrackingError=TrackingError, StoreError=RuntimeError, ENV_URI="X",
    check_reachable=lambda *a, **k: None, resolve_tracking_uri=lambda *a, **k: "none",
    kill_if_running=lambda *a, **k: False, run_tags=lambda *a, **k: {},
    start_run=lambda *a, **k: RunRef("gpu-run", "0", "none", "gpu"),
    end_run=lambda *a, **k: None, log_metrics=lambda ref, m, step=0: METRICS.append((step, m)),
    log_text=lambda *a, **k: None, log_artifact=lambda *a, **k: None,
    set_tags=lambda *a, **k: None, lightning_logger=_lightning_logger,
    write_run_json=lambda path, ref: Path(path).write_text(json.dumps(ref.__dict__)))
sys.modules["nmt.tracking"] = fake
import nmt  # noqa: E402

nmt.tracking = fake

import nmt.data.vectorize as vec  # noqa: E402

NPZ = np.load(HERE / "splits.npz")


def load_split(processed_dir, split):
    def ragged(f):
        flat, lens = NPZ[f"{split}_{f}"].astype(np.int32), NPZ[f"{split}_{f}_len"]
        return np.split(flat, np.cumsum(lens)[:-1])
    text = json.loads((HERE / f"{split}_text.json").read_text())
    return vec.SplitData(src=ragged("src"), trg=ragged("trg"), en=text["en"], fr=text["fr"],
                         group=NPZ[f"{split}_group"].astype(np.int64))


vec.load_split = load_split
import nmt.data.datamodule as dmod  # noqa: E402

dmod.load_split = load_split

PROCESSED = Path("/tmp/processed")
PROCESSED.mkdir(exist_ok=True)
if not (PROCESSED / "tokenizers").exists():
    import shutil
    shutil.copytree(HERE / "tokenizers", PROCESSED / "tokenizers")
MODEL_DIR = Path("/tmp/gpu_models")
MINUTES = float(os.environ.get("GPU_MINUTES", "5"))
ARCH = os.environ.get("GPU_ARCH", "rnn")  # rnn | transformer: which GPU profile
GPU_PROFILE = {
    "train": {"accelerator": "gpu", "precision": "bf16-mixed", "batch_tokens": 12000,
              "max_minutes": MINUTES, "max_steps": -1, "max_epochs": 30, "num_threads": 0},
    "model": {"rnn": "lstm", "input_feeding": True, "hidden": 512, "emb_dim": 512},
}
if ARCH == "transformer":  # the committed profile (not yet run on a GPU), with GPU_MINUTES
    from nmt.config import read_yaml  # noqa: E402

    GPU_PROFILE = read_yaml(REPO / "reports/gpu/params_gpu_transformer.yaml")
    GPU_PROFILE["train"]["max_minutes"] = MINUTES
elif ARCH != "rnn":
    sys.exit(f"GPU_ARCH={ARCH!r}: use rnn or transformer")

if DRY:
    GPU_PROFILE["train"].update(accelerator="cpu", precision="32-true", num_threads=1,
                                max_steps=4, val_every_steps=2, val_bleu_sentences=20)
    GPU_PROFILE["model"].update(hidden=32, emb_dim=32)
    if ARCH == "transformer":
        GPU_PROFILE["model"]["transformer"].update(layers=1, heads=2, d_model=32, ff_dim=64)


@phase("train_gpu_profile")
def train_phase():
    import yaml

    from nmt.config import load_params
    from nmt.training import train
    prof = OUT / ("params_gpu.yaml" if ARCH == "rnn" else "params_gpu_transformer.yaml")
    prof.write_text(yaml.safe_dump(GPU_PROFILE))
    params = load_params(REPO / "params.yaml", prof)
    res = train(params, PROCESSED, MODEL_DIR, OUT / "reports", repo_root=REPO)
    hist = OUT / "reports" / "history.csv"
    return {"result": res.__dict__, "profile": GPU_PROFILE,
            "history_tail": hist.read_text().splitlines()[-6:] if hist.exists() else None,
            "peak_gpu_mem_gb": None if DRY else round(torch.cuda.max_memory_allocated() / 2**30, 2)}


@phase("evaluate_gpu")
def eval_phase():
    import sacrebleu

    from nmt.translator import Translator
    spec = importlib.util.spec_from_file_location("dt", REPO / "bench" / "decode_throughput.py")
    dt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dt)
    sources, refs = load_split(None, "test").references()
    tr = Translator.from_model_dir(MODEL_DIR, device="cpu" if DRY else "cuda")
    if DRY:
        sources, refs = sources[:40], refs[:40]
    out = {"bench_batch128": dt.bench_device(tr, sources, refs, 300, 128, 5)[0]}
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    for bs in (512, 1024):
        if not DRY:
            torch.cuda.synchronize()
        t = time.perf_counter()
        hyps = tr.translate(sources, beam_size=5, batch_size=bs)
        if not DRY:
            torch.cuda.synchronize()
        dt_s = time.perf_counter() - t
        out[f"beam5_batch{bs}"] = {
            "sentences_per_s": round(len(sources) / dt_s, 1),
            "bleu": round(sacrebleu.BLEU().corpus_score([h.text for h in hyps], streams).score, 2)}
    out["examples"] = {s: tr.translate([s], beam_size=5)[0].text
                       for s in ("Be nice.", "Drop it!", "Get out!")}
    return out


train_phase()
if RESULT["train_gpu_profile"]["ok"]:
    eval_phase()
save()
