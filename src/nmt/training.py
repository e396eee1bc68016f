"""`train(...)`: fit the seq2seq model with Lightning, track it in MLflow, write the model dir.

Stopping: `max_epochs`, `max_steps`, `max_minutes` (Lightning `max_time`) or early stopping on
`val/loss`, whichever comes first; a last validation (and checkpoint) always runs at the stop.
Validation runs every `val_every_steps` steps (rounded down by up to 20% so that it also lands
on every epoch end, see `nmt.data.datamodule.epoch_plan`).

Resume: `models/checkpoints/state.json` records a fingerprint of everything that shapes training
(params sections seed/vectorize/model/train, the decoding limits used for val/bleu, the processed
data files, and the source of the model, data module and LightningModule). When the stage runs
again with the same fingerprint and an unfinished training, it resumes from
`models/checkpoints/last.ckpt` (mid-epoch, at the exact batch, with the remaining `max_minutes`);
otherwise it clears the folder and starts fresh. Every (re)start is a new MLflow run; a
previous run still marked RUNNING (the process was killed with SIGKILL) is set to KILLED, and the
new run is tagged `resumed_from_run_id` / `resumed_from_step`. Ctrl-C and SIGTERM end the run as
KILLED (SIGTERM stops at the end of the current batch), other exceptions as FAILED.

Progress: a line every `log_every_steps` (a bar too on a terminal) and the per-step history
`reports/train/steps.csv`, see `nmt.progress`. Precision: `nmt.precision.resolve_precision`.

Size: one module past the ~300-line guideline on purpose: trainer construction, the resume
state and the hand-off of the run and the model folder (`nmt.checkpoint.ModelDir`) share one
`train` call's run, fingerprint and failure handling; the resume fingerprint also hashes this
module's imports (`package_imports(__file__)`), which a split would have to thread through.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nmt import tracking
from nmt.allocator import ENV as ALLOCATOR_ENV
from nmt.allocator import ONEDNN_CACHE_ENV, bound_onednn_cache, keep_freed_memory
from nmt.checkpoint import LAST_CKPT, ModelDir
from nmt.config import ConfigError, Params, TrainConfig
from nmt.data.datamodule import TranslationDataModule, bleu_subset
from nmt.data.vectorize import TOKENIZERS_DIR, tokenizers_dir
from nmt.data.vocab import load_tokenizers
from nmt.io import write_json, write_text
from nmt.lit_module import BleuProbe, NonFiniteLossError, Seq2SeqModule
from nmt.precision import resolve_precision
from nmt.progress import STEPS_FILE, TrainProgress
from nmt.sources import package_imports
from nmt.tracking import RunRef, TrackingError

__all__ = ["LAST_CKPT", "NonFiniteLossError", "TrackingError", "TrainResult", "check_runtime",
           "train"]

log = logging.getLogger(__name__)

HISTORY_KEYS = ("val/loss", "val/ppl", "val/bleu", "train/loss", "train/lr")
SIGTERM_EXIT = 128 + signal.SIGTERM


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    best_checkpoint: str
    best_val_loss: float
    best_val_bleu: float
    epochs: float
    steps: int
    tokens_per_s: float
    wall_s: float


def check_runtime(cfg: TrainConfig) -> str:
    """Resolve the accelerator ('cpu', 'cuda' or 'mps'); ConfigError before any work.

    The precision is checked against it by `nmt.precision.resolve_precision`.
    """
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if cfg.accelerator in ("gpu", "cuda") and not cuda:
        raise ConfigError("train.accelerator", f"{cfg.accelerator!r} requested but no CUDA "
                                               "device is visible; use cpu or auto")
    if cfg.accelerator == "mps" and not mps:
        raise ConfigError("train.accelerator", "'mps' requested but MPS is not available")
    resolved = {"gpu": "cuda", "cuda": "cuda", "mps": "mps", "cpu": "cpu"}.get(
        cfg.accelerator, "cuda" if cuda else "mps" if mps else "cpu")
    return resolved


def _global_rank(cfg: TrainConfig) -> int:
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("NODE_RANK", 0)) * cfg.devices + int(os.environ.get("LOCAL_RANK", 0))


# ------------------------------------------------------------------------------ resume state
def fingerprint(params: Params, processed_dir: Path) -> str:
    """Hash of what shapes training: params sections, decoding limits, data files, model code."""
    digest = hashlib.sha256()
    search = params.evaluate.search
    shaping = {"seed": params.seed, "vectorize": asdict(params.vectorize),
               "model": asdict(params.model), "train": asdict(params.train),
               "val_decoding": [search.max_len_ratio, search.max_len_offset, search.batch_size]}
    digest.update(json.dumps(shaping, sort_keys=True).encode())
    files = [p for p in sorted(Path(processed_dir).rglob("*")) if p.is_file()
             and (p.name.startswith(("train.", "valid.")) or p.parent.name == TOKENIZERS_DIR)]
    # code whose change makes an unfinished checkpoint stale: this module and every nmt module it
    # imports, found the way tests/unit/test_dvc_deps.py checks the train stage's dvc.yaml deps
    files += package_imports(Path(__file__))
    for path in files:
        digest.update(path.name.encode())
        digest.update(hashlib.md5(path.read_bytes()).digest())
    return digest.hexdigest()


def _read_state(folder: ModelDir) -> dict[str, Any]:
    try:
        return json.loads(folder.state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _resume_point(folder: ModelDir, fp: str, is_zero: bool
                  ) -> tuple[Path | None, RunRef | None]:
    """(last.ckpt to resume from or None, the previous run); clears the folder on a fresh start."""
    state = _read_state(folder)
    previous = RunRef(**state["run"]) if state.get("run") else None
    last, ckpt_dir = folder.last_checkpoint, folder.checkpoints_dir
    if state.get("fingerprint") == fp and not state.get("completed") and last.is_file():
        return last, previous
    if is_zero and ckpt_dir.exists():
        reason = "params, data or code changed" if state.get("fingerprint") != fp else (
            "previous training completed" if state.get("completed") else "no last.ckpt")
        log.info("starting fresh (%s): clearing %s", reason, ckpt_dir)
        shutil.rmtree(ckpt_dir)
    return None, previous


def _write_state(folder: ModelDir, fp: str, ref: RunRef | None, completed: bool) -> None:
    write_json(folder.state_file, {"fingerprint": fp, "completed": completed,
                                   "run": asdict(ref) if ref else None})


# --------------------------------------------------------------------------------- callbacks
class StopAtMaxSteps(L.Callback):
    """Request the stop at `max_steps` so Lightning runs a last validation (and checkpoint)."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if 0 < self.max_steps <= trainer.global_step:
            trainer.should_stop = True


class ValidationRecorder(L.Callback):
    """History of validations (kept in checkpoints) and sample translations to MLflow."""

    def __init__(self, run: RunRef | None) -> None:
        self.run = run
        self.history: list[dict[str, float]] = []
        self.samples: list[str] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch,
               **{k: float(metrics[k]) for k in HISTORY_KEYS if k in metrics}}
        self.history.append(row)
        if trainer.is_global_zero:
            log.info("validation at step %d (epoch %d): %s", row["step"], row["epoch"],
                     ", ".join(f"{k} {row[k]:.4g}" for k in HISTORY_KEYS if k in row))
        samples = getattr(pl_module, "last_samples", "")
        if samples:
            self.samples.append(samples)
            if self.run is not None and trainer.is_global_zero:
                tracking.log_text(self.run, samples, f"samples/step_{trainer.global_step:07d}.md")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "samples": self.samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.samples = list(state_dict["samples"])


# ------------------------------------------------------------------------------------ train
def _build_trainer(cfg: TrainConfig, precision: str, dm: TranslationDataModule, ckpt_dir: Path,
                   reports_dir: Path, run: RunRef | None, is_zero: bool
                   ) -> tuple[L.Trainer, ModelCheckpoint]:
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best-step{step:07d}", monitor="val/loss",
                           mode="min", save_top_k=1, save_last=True,
                           auto_insert_metric_name=False)
    callbacks = [best, EarlyStopping(monitor="val/loss", mode="min",
                                     patience=cfg.early_stopping_patience,
                                     check_on_train_epoch_end=False),
                 StopAtMaxSteps(cfg.max_steps), ValidationRecorder(run),
                 TrainProgress(cfg.log_every_steps, Path(reports_dir) / STEPS_FILE if is_zero
                               else None)]
    logger = tracking.lightning_logger(run) if (run is not None and is_zero) else False
    trainer = L.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=cfg.strategy, precision=precision, max_epochs=cfg.max_epochs,
        max_steps=cfg.max_steps, max_time={"minutes": cfg.max_minutes},
        val_check_interval=dm.val_interval, check_val_every_n_epoch=1,
        gradient_clip_val=cfg.grad_clip or None, gradient_clip_algorithm="norm",
        deterministic=True, use_distributed_sampler=False, log_every_n_steps=cfg.log_every_steps,
        num_sanity_val_steps=1, enable_progress_bar=False, enable_model_summary=is_zero,
        logger=logger, callbacks=callbacks, default_root_dir=ckpt_dir)
    return trainer, best


@contextmanager
def _sigterm_outside_fit() -> Iterator[dict[str, bool]]:
    """SIGTERM outside `fit` exits at once (143); inside, Lightning stops after the batch."""
    flag = {"in_fit": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if not flag["in_fit"]:
            raise SystemExit(SIGTERM_EXIT)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(params: Params, processed_dir: Path, model_dir: Path, reports_dir: Path,
          repo_root: Path) -> TrainResult:
    """Fit, then write `model_dir` and `reports_dir` (rank 0); see the module docstring."""
    t_start = time.perf_counter()
    cfg = params.train
    precision = resolve_precision(cfg.precision, check_runtime(cfg))
    rank = _global_rank(cfg)
    is_zero = rank == 0
    folder = ModelDir(Path(model_dir))
    ckpt_dir = folder.checkpoints_dir
    if is_zero:
        tracking.check_reachable(tracking.resolve_tracking_uri(params.tracking, repo_root))
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    if keep_freed_memory("train"):
        log.info("malloc: freed tensor memory stays in the process (%s=system to turn off)",
                 ALLOCATOR_ENV)
    log.info("oneDNN primitive cache: %s (%s)", bound_onednn_cache(), ONEDNN_CACHE_ENV)
    L.seed_everything(params.seed, workers=True, verbose=False)
    dm = TranslationDataModule(processed_dir, cfg, params.seed, cfg.devices * cfg.num_nodes)
    dm.setup("fit")
    src_tok, trg_tok = load_tokenizers(tokenizers_dir(processed_dir))
    module = Seq2SeqModule(model=asdict(params.model), train=asdict(cfg),
                           src_vocab_size=src_tok.vocab_size, trg_vocab_size=trg_tok.vocab_size)
    assert dm.valid_split is not None
    search = params.evaluate.search
    module.bleu_probe = BleuProbe(bleu_subset(dm.valid_split, cfg.val_bleu_sentences, params.seed),
                                  trg_tok.decode, search.batch_size, search.max_len_ratio,
                                  search.max_len_offset, cfg.val_samples)

    fp = fingerprint(params, processed_dir)
    resume, previous = _resume_point(folder, fp, is_zero)
    run = None
    if is_zero:
        if previous is not None and tracking.kill_if_running(previous):
            log.warning("previous run %s was left RUNNING (killed process): marked KILLED",
                        previous.run_id)
        extra = {"stage": "train", "precision": precision}
        if resume is not None:
            step = int(torch.load(resume, map_location="cpu", weights_only=True)["global_step"])
            log.info("resuming from %s at step %d", resume, step)
            extra.update(resumed_from_step=str(step),
                         resumed_from_run_id=previous.run_id if previous else "")
        run = tracking.start_run(params, repo_root, tracking.run_tags(repo_root, processed_dir,
                                                                      extra))
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _write_state(folder, fp, run, completed=False)
        tracking.log_metrics(run, {"data/padding_src": dm.padding["src"],
                                   "data/padding_trg": dm.padding["trg"],
                                   "model/parameters": module.num_parameters})

    trainer, best = _build_trainer(cfg, precision, dm, ckpt_dir, reports_dir, run, is_zero)
    try:
        with _sigterm_outside_fit() as flag, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* not empty")
            flag["in_fit"] = True
            trainer.fit(module, datamodule=dm, ckpt_path=resume)
            flag["in_fit"] = False
            if not is_zero:
                return _result("", best, trainer, module, dm, t_start)
            assert run is not None
            result = _finish(params, module, trainer, best, dm, processed_dir, folder,
                             reports_dir, run, t_start)
    except BaseException as exc:
        if run is not None:
            _end_failed_run(run, exc)
        if isinstance(exc, SIGTERMException):
            raise SystemExit(SIGTERM_EXIT) from exc
        if run is not None and isinstance(exc, tracking.StoreError):
            raise TrackingError(
                f"MLflow store {run.tracking_uri} failed during training ({exc}). Bring the "
                f"store back (or point {tracking.ENV_URI} at another) and run the stage "
                f"again: it resumes from the last checkpoint in {ckpt_dir} in a new run") from exc
        raise
    tracking.end_run(run, "FINISHED")
    _write_state(folder, fp, run, completed=True)
    return result


def _end_failed_run(run: RunRef, exc: BaseException) -> None:
    """Mark `run` KILLED (interrupt) or FAILED; if the store itself is gone, say so and go on."""
    interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
    status = "KILLED" if interrupted else "FAILED"
    try:
        tracking.end_run(run, status)
    except tracking.StoreError as end_exc:
        log.error("could not mark MLflow run %s %s at %s (%s); the next train run marks it "
                  "KILLED", run.run_id, status, run.tracking_uri, end_exc)
        return
    log.error("training %s; MLflow run %s marked %s",
              "interrupted" if interrupted else "failed", run.run_id, status)


def _recorder(trainer: L.Trainer) -> ValidationRecorder:
    return next(c for c in trainer.callbacks if isinstance(c, ValidationRecorder))


def _best_row(trainer: L.Trainer, best: ModelCheckpoint) -> dict[str, float]:
    history = _recorder(trainer).history
    if not history:
        return {}
    return min(history, key=lambda r: (r.get("val/loss", math.inf), -r["step"]))


def _result(run_id: str, best: ModelCheckpoint, trainer: L.Trainer, module: Seq2SeqModule,
            dm: TranslationDataModule, t_start: float) -> TrainResult:
    row = _best_row(trainer, best)
    rate = module.total_tokens * trainer.world_size / max(module.total_train_s, 1e-9)
    return TrainResult(
        run_id=run_id, best_checkpoint=best.best_model_path,
        best_val_loss=float(row.get("val/loss", math.nan)),
        best_val_bleu=float(row.get("val/bleu", math.nan)),
        epochs=round(trainer.global_step / max(dm.batches_per_epoch, 1), 3),
        steps=trainer.global_step, tokens_per_s=round(rate, 1),
        wall_s=round(time.perf_counter() - t_start, 1))


def _finish(params: Params, module: Seq2SeqModule, trainer: L.Trainer, best: ModelCheckpoint,
            dm: TranslationDataModule, processed_dir: Path, folder: ModelDir, reports_dir: Path,
            run: RunRef, t_start: float) -> TrainResult:
    """Write the model dir and reports from the best checkpoint; log them to the run."""
    best_path = Path(best.best_model_path or folder.last_checkpoint)
    ckpt = torch.load(best_path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    row = _best_row(trainer, best)
    folder.save(params, state, module.model.src_vocab_size, module.model.trg_vocab_size,
                tokenizers_dir(processed_dir), step=int(ckpt["global_step"]),
                val_loss=float(row.get("val/loss", math.nan)))
    tracking.write_run_json(folder.run_file, run)

    result = _result(run.run_id, best, trainer, module, dm, t_start)
    reports_dir = Path(reports_dir)
    metrics = {"val/loss": result.best_val_loss, "val/ppl": math.exp(min(result.best_val_loss, 50)),
               "val/bleu": result.best_val_bleu, "best_step": int(ckpt["global_step"]),
               "epochs": result.epochs, "steps": result.steps,
               "train/tokens_per_s": result.tokens_per_s, "wall_s": result.wall_s,
               "parameters": module.num_parameters, "padding_trg": round(dm.padding["trg"], 4)}
    write_json(reports_dir / "metrics.json", metrics)
    recorder = _recorder(trainer)
    _write_history(reports_dir / "history.csv", recorder.history)
    write_text(reports_dir / "samples.md", "\n".join(recorder.samples))

    tracking.log_artifact(run, folder.tokenizers_dir, "tokenizers")
    for path in (folder.model_file, folder.config_file):
        tracking.log_artifact(run, path, "model")
    for name in ("metrics.json", "history.csv", STEPS_FILE):
        tracking.log_artifact(run, reports_dir / name, "reports/train")
    tracking.set_tags(run, {"best_checkpoint": best_path.name})
    log.info("best val/loss %.4f val/bleu %.2f at step %d; %d steps, %.0f target tokens/s",
             result.best_val_loss, result.best_val_bleu, metrics["best_step"], result.steps,
             result.tokens_per_s)
    return result


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["step", "epoch", *HISTORY_KEYS]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
