"""Training progress for people: a line every `train.log_every_steps`, a bar on a terminal.

    INFO nmt.progress: step 50/1400 (4%) | train/loss 6.213 | lr 0.00075 | 3,402 tgt tok/s |
                       elapsed 0:00:58 | ETA 0:26:10

Lines go through `logging` always (DVC pipes the output, so they are what `dvc repro` shows);
a tqdm bar on stderr is added only when stderr is a terminal, with the lines printed above it.
The same values, one row per progress line, go to `steps.csv` (step, epoch, train/loss,
train/ppl, train/lr, train/tokens_per_s, elapsed_s), rewritten atomically at each line, so
`dvc plots show` draws the training curve, also while training runs. The rows are kept in
checkpoints, so a resumed run continues the same file.

Reads only what the LightningModule already logged (`trainer.callback_metrics`) and the clock:
no tensor work and no random numbers, so the weights do not depend on it (or on
`log_every_steps`). ETA: remaining steps at this process's pace (validations included), capped
by what is left of `train.max_minutes`.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer

from nmt.io import write_text

log = logging.getLogger(__name__)

STEPS_FILE = "steps.csv"
STEP_KEYS = ("train/loss", "train/ppl", "train/lr", "train/tokens_per_s")
FIELDS = ("step", "epoch", *STEP_KEYS, "elapsed_s")


def format_duration(seconds: float) -> str:
    """`H:MM:SS` (hours not wrapped at 24)."""
    total = max(int(round(seconds)), 0)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def total_steps(trainer: L.Trainer) -> int:
    """Steps this fit can reach: `max_steps` or `max_epochs` x batches per epoch, the smaller."""
    per_epoch = trainer.num_training_batches
    by_epochs = (trainer.max_epochs or 0) * per_epoch if per_epoch != float("inf") else 0
    limits = [int(n) for n in (trainer.max_steps, by_epochs) if n and n > 0]
    return min(limits, default=0)


class TrainProgress(L.Callback):
    """Progress lines, an optional bar and `steps.csv`, on global rank 0 only.

    Args:
        every: a line (and a CSV row) every this many optimizer steps (`train.log_every_steps`,
            the interval at which the LightningModule logs `train/*`).
        csv_path: where to write the per-step history; None writes nothing.
        bar: draw a tqdm bar on stderr; None = when stderr is a terminal.
    """

    def __init__(self, every: int, csv_path: Path | None, bar: bool | None = None) -> None:
        self.every, self.csv_path = every, csv_path
        self.bar = sys.stderr.isatty() if bar is None else bar
        self.rows: list[dict[str, float]] = []
        self._total, self._start_step, self._t0 = 0, 0, 0.0
        self._tqdm: Any = None
        self._stack = ExitStack()

    # ------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._total, self._start_step = total_steps(trainer), trainer.global_step
        self._t0 = time.monotonic()
        self.rows = [r for r in self.rows if r["step"] <= trainer.global_step]
        log.info("training %s steps (%d batches per epoch, from step %d); a progress line "
                 "every %d steps", self._total or "?", trainer.num_training_batches,
                 self._start_step, self.every)
        if self.bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._stack.enter_context(logging_redirect_tqdm())  # lines print above the bar
            self._tqdm = self._stack.enter_context(tqdm(
                total=self._total or None, initial=self._start_step, unit="step",
                file=sys.stderr, dynamic_ncols=True, desc="train"))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        if self._tqdm is not None and step > self._tqdm.n:
            self._tqdm.update(step - self._tqdm.n)
        if step > self._start_step and step % self.every == 0 and (
                not self.rows or self.rows[-1]["step"] < step):
            self._report(trainer, step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            log.info("validating at step %d ...", trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        if trainer.is_global_zero:
            self._write_csv()  # also when no progress line was due (a header-only file)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])

    # ---------------------------------------------------------------------------- helpers
    def _report(self, trainer: L.Trainer, step: int) -> None:
        metrics = trainer.callback_metrics
        values = {k: float(f"{float(metrics[k]):.6g}") for k in STEP_KEYS if k in metrics}
        elapsed = self._elapsed(trainer)
        self.rows.append({"step": step, "epoch": trainer.current_epoch, **values,
                          "elapsed_s": round(elapsed, 1)})
        eta = self._eta(trainer, step)
        done = f"{step}/{self._total} ({100 * step / self._total:.0f}%)" if self._total else (
            str(step))
        log.info("step %s | train/loss %s | lr %s | %s tgt tok/s | elapsed %s | ETA %s", done,
                 _fmt(values.get("train/loss"), ".4g"), _fmt(values.get("train/lr"), ".3g"),
                 _fmt(values.get("train/tokens_per_s"), ",.0f"), format_duration(elapsed),
                 format_duration(eta) if eta is not None else "?")
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(f"loss {_fmt(values.get('train/loss'), '.4g')}, "
                                       f"{_fmt(values.get('train/tokens_per_s'), ',.0f')} tok/s",
                                       refresh=True)
        self._write_csv()

    def _elapsed(self, trainer: L.Trainer) -> float:
        """Seconds of fitting, previous (resumed) runs included when Lightning's Timer runs."""
        timer = _timer(trainer)
        return timer.time_elapsed("train") if timer else time.monotonic() - self._t0

    def _eta(self, trainer: L.Trainer, step: int) -> float | None:
        if not self._total or step <= self._start_step:
            return None
        pace = (time.monotonic() - self._t0) / (step - self._start_step)
        eta = pace * max(self._total - step, 0)
        timer = _timer(trainer)
        left = timer.time_remaining("train") if timer else None
        return min(eta, max(left, 0.0)) if left is not None else eta

    def _write_csv(self) -> None:
        if self.csv_path is None:
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.csv_path, text.getvalue())

    def _close(self) -> None:
        self._tqdm = None
        self._stack.close()


def _timer(trainer: L.Trainer) -> Timer | None:
    return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)


def _fmt(value: float | None, spec: str) -> str:
    return "?" if value is None else format(value, spec)
