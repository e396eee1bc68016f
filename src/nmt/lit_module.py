"""LightningModule around `Seq2Seq`: loss, optimiser and schedule, logging, validation BLEU.

Glue only: the model is plain PyTorch (`nmt.model`), batches come from `nmt.data.datamodule`.

Loss: label-smoothed cross entropy summed over real target tokens (PAD ignored) divided by the
number of real target tokens. `val/loss` is the plain cross entropy (no smoothing), so
`val/ppl = exp(val/loss)` is a true perplexity; `train/ppl` likewise comes from the unsmoothed
loss of the logged step.

Learning rate: linear warmup over `warmup_steps`, then
    inverse_sqrt  lr * sqrt(warmup / step)
    cosine        lr * 0.5 * (1 + cos(pi * progress)) over the steps Lightning expects
    plateau       lr * 0.5 ** k, k = validations whose val/loss did not beat the best one
    constant      lr
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

from nmt.config import ModelConfig, TrainConfig
from nmt.data.datamodule import Batch, BleuSubset, pad_sources
from nmt.metrics import corpus_bleu
from nmt.model import build_model, count_parameters, greedy_search
from nmt.specials import PAD_ID

log = logging.getLogger(__name__)

PLATEAU_FACTOR = 0.5  # `plateau`: multiply the lr by this after a validation without improvement


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def sequence_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Summed (label-smoothed) cross entropy over the non-PAD positions of `target`.

    Args:
        logits: raw scores, shape (B, T, V).
        target: gold ids, shape (B, T), PAD_ID where ignored.
    Returns:
        scalar sum over real tokens (divide by their count for the mean).
    """
    return _SmoothedCrossEntropy.apply(logits.flatten(0, 1), target.flatten(), label_smoothing)


class _SmoothedCrossEntropy(torch.autograd.Function):
    """`F.cross_entropy(logits.float(), target, ignore_index=PAD_ID, label_smoothing=eps,
    reduction="sum")` with a one-pass backward.

    The output layer's logits are the step's largest tensors (3,000 target tokens x 8,000 pieces).
    PyTorch's label-smoothed loss keeps the fp32 log-softmax and in backward fills a zero
    gradient for the NLL term, adds the smoothing term's and runs the log-softmax backward: five
    passes over 96 MB. Here the forward keeps only the per-row log-sum-exp, and the backward
    writes the gradient, softmax - eps / V - (1 - eps) * onehot(target), in one pass (and casts it
    back to bf16 under autocast). Same loss and gradient to fp32 rounding (tests/unit/
    test_lit_module.py); the default Transformer's fp32 step 916 -> 878 ms on a 2-core Zen 4 EPYC
    (bench/train_throughput.py).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, eps: float) -> Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            x = logits.float()  # (N, V); a no-op for fp32 logits
            keep = target != PAD_ID
            gold = target.masked_fill(~keep, 0)
            lse = torch.logsumexp(x, dim=-1)  # (N,)
            rows = (1.0 - eps) * (lse - x.gather(1, gold[:, None]).squeeze(1))
            if eps > 0:
                rows = rows + eps * (lse - x.mean(dim=-1))  # -mean(log p) = lse - mean(x)
            loss = rows.masked_fill(~keep, 0.0).sum()
        ctx.save_for_backward(logits, lse, gold, keep)
        ctx.eps = eps
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, lse, gold, keep = ctx.saved_tensors
        eps = ctx.eps
        with torch.autocast(logits.device.type, enabled=False):
            g = torch.sub(logits, lse[:, None]).exp_()  # softmax, fp32 (new tensor)
            if eps > 0:
                g.sub_(eps / logits.shape[-1])
            g.scatter_add_(1, gold[:, None], g.new_full((len(gold), 1), eps - 1.0))
            g.mul_((keep.to(g.dtype) * grad.float())[:, None])
        return g.to(logits.dtype), None, None


class LrSchedule:
    """Multiplier of the peak lr at optimizer step `step` (a callable for `LambdaLR`).

    A callable object, so `LambdaLR.state_dict` saves its attributes (the plateau state) in
    checkpoints.
    """

    def __init__(self, kind: str, warmup_steps: int, total_steps: int) -> None:
        self.kind, self.warmup, self.total = kind, warmup_steps, max(total_steps, 1)
        self.plateau_scale, self.best = 1.0, math.inf

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "inverse_sqrt":
            return math.sqrt(max(self.warmup, 1) / max(step, 1))
        if self.kind == "cosine":
            span = max(self.total - self.warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(step - self.warmup, span) / span))
        if self.kind == "plateau":
            return self.plateau_scale
        return 1.0

    def observe(self, val_loss: float) -> None:
        """Plateau bookkeeping after each validation (no effect for other kinds)."""
        if val_loss < self.best:
            self.best = val_loss
        elif self.kind == "plateau":
            self.plateau_scale *= PLATEAU_FACTOR


@dataclass
class BleuProbe:
    """Greedy BLEU on a fixed subset of validation sources (all references each)."""

    subset: BleuSubset
    decode: Callable[[list[int]], str]
    batch_size: int
    max_len_ratio: float
    max_len_offset: int
    samples: int


class Seq2SeqModule(L.LightningModule):
    """Thin LightningModule; hyperparameters are plain dicts (weights-only checkpoints)."""

    def __init__(self, model: dict[str, Any], train: dict[str, Any], src_vocab_size: int,
                 trg_vocab_size: int) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.cfg = TrainConfig(**train)
        self.model = build_model(ModelConfig(**model), src_vocab_size, trg_vocab_size)
        self.schedule: LrSchedule | None = None
        self.bleu_probe: BleuProbe | None = None
        self.last_samples = ""
        self.total_tokens, self.total_train_s = 0, 0.0
        self._window_tokens, self._window_s, self._t0 = 0, 0.0, 0.0
        self._val_sums: list[Tensor] = []

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def forward(self, batch: Batch) -> Tensor:
        return self.model(batch.src, batch.src_lengths, batch.trg_in)

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logits = self(batch)
        loss = sequence_loss(logits, batch.trg_out, self.cfg.label_smoothing) / batch.n_tokens
        self._check_finite(loss)
        if (self.global_step + 1) % self.cfg.log_every_steps == 0:
            with torch.no_grad():
                nll = sequence_loss(logits.detach(), batch.trg_out) / batch.n_tokens
            self._log_train(loss.detach(), nll)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._t0
        self._window_tokens += batch.n_tokens
        self._window_s += seconds
        self.total_tokens += batch.n_tokens
        self.total_train_s += seconds

    def _check_finite(self, loss: Tensor) -> None:
        finite = torch.isfinite(loss)
        if self.trainer.world_size > 1:
            finite = torch.tensor(self.trainer.strategy.reduce_boolean_decision(
                bool(finite), all=True))
        if not bool(finite):
            raise NonFiniteLossError(
                f"train/loss is {loss.item()} at step {self.global_step} (epoch "
                f"{self.current_epoch}); lower train.lr, raise train.warmup_steps or set "
                "train.grad_clip > 0")

    def _log_train(self, loss: Tensor, nll: Tensor) -> None:
        world = self.trainer.world_size
        rate = self._window_tokens * world / self._window_s if self._window_s > 0 else 0.0
        self._window_tokens, self._window_s = 0, 0.0
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log_dict({"train/loss": loss, "train/ppl": torch.exp(nll.clamp(max=50.0)),
                       "train/lr": lr, "train/tokens_per_s": rate, "epoch": self.current_epoch,
                       "step": self.global_step + 1},  # MLflow step = updates incl. this one
                      on_step=True, on_epoch=False, batch_size=1)

    def configure_optimizers(self) -> dict[str, Any]:
        opt_cls = torch.optim.AdamW if self.cfg.optimizer == "adamw" else torch.optim.Adam
        optimizer = opt_cls(self.model.parameters(), lr=self.cfg.lr,
                            weight_decay=self.cfg.weight_decay)
        self.schedule = LrSchedule(self.cfg.lr_schedule, self.cfg.warmup_steps,
                                   self._expected_steps())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _expected_steps(self) -> int:
        """Steps until max_steps or max_epochs (cosine length; max_minutes may stop earlier).

        Not `trainer.estimated_stepping_batches`: it builds the train loader before a resumed
        checkpoint is restored, and Lightning then skips restoring the loader's position.
        """
        per_epoch = getattr(self.trainer.datamodule, "batches_per_epoch", 0)
        limits = [n for n in (self.cfg.max_steps, self.cfg.max_epochs * per_epoch) if n > 0]
        return min(limits, default=1)

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_sums = [torch.zeros((), device=self.device)] * 2  # (NLL sum, tokens)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        nll = sequence_loss(self(batch), batch.trg_out)
        self._val_sums = [self._val_sums[0] + nll, self._val_sums[1] + batch.n_tokens]

    def on_validation_epoch_end(self) -> None:
        nll_sum, tokens = (self.trainer.strategy.reduce(t, reduce_op="sum")
                           for t in self._val_sums)
        val_loss = nll_sum / tokens.clamp(min=1)
        self.log_dict({"val/loss": val_loss, "val/ppl": torch.exp(val_loss.clamp(max=50.0))},
                      sync_dist=True, batch_size=1)
        self.log_dict({"epoch": float(self.current_epoch), "step": float(self.global_step)},
                      sync_dist=True, batch_size=1)
        if self.trainer.sanity_checking:
            return
        if self.schedule is not None:
            self.schedule.observe(float(val_loss))
        if self.bleu_probe is not None:
            bleu, self.last_samples = self._validation_bleu(self.bleu_probe)
            self.log("val/bleu", bleu, sync_dist=True, batch_size=1)

    def _validation_bleu(self, probe: BleuProbe) -> tuple[float, str]:
        """Greedy-decode this rank's share of the subset, gather, score, format samples."""
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = list(range(rank, len(probe.subset.src), world))
        hyps: dict[int, str] = {}
        for start in range(0, len(mine), probe.batch_size):
            rows = mine[start : start + probe.batch_size]
            src, lengths = pad_sources([probe.subset.src[i] for i in rows])
            result = greedy_search(self.model, src.to(self.device), lengths.to(self.device),
                                   probe.max_len_ratio, probe.max_len_offset)
            hyps.update((i, probe.decode(t[0])) for i, t in zip(rows, result.tokens, strict=True))
        if world > 1:
            gathered: list[dict[int, str] | None] = [None] * world
            torch.distributed.all_gather_object(gathered, hyps)
            hyps = {k: v for part in gathered if part for k, v in part.items()}
        ordered = [hyps[i] for i in range(len(probe.subset.src))]
        return corpus_bleu(ordered, probe.subset.references), self._format_samples(probe, ordered)

    def _format_samples(self, probe: BleuProbe, hyps: list[str]) -> str:
        lines = [f"## step {self.global_step} (epoch {self.current_epoch})", ""]
        count = min(probe.samples, len(hyps))
        for i in sorted({round(k * (len(hyps) - 1) / max(count - 1, 1)) for k in range(count)}):
            lines += [f"- source: {probe.subset.sources[i]}", f"  - hypothesis: {hyps[i]}",
                      f"  - references: {' | '.join(probe.subset.references[i])}"]
        return "\n".join(lines) + "\n"
