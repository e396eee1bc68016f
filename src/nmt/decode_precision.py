"""Decoding precision: `evaluate.search.precision` (auto | fp32 | bf16), resolved per device.

    fp32   fp32 everywhere.
    bf16   a bf16 copy of the model decodes (weights and activations in bf16: matrix products
           and the RNNs run on the CPU's bf16 units); the log-softmax over the output layer,
           the search scores and the attention weights stay fp32 (`Fp32LogProbs`), so beam
           ranking accumulates in fp32. (Measured on the default model, Xeon with AMX: the copy
           is ~1.5x faster than fp32; `torch.autocast` was slower than fp32, since it leaves
           the RNNs in fp32 and casts at every step.)
           On CPU only with bf16 units (`amx_bf16` or `avx512_bf16`, `nmt.precision`); refused
           elsewhere, since emulated bf16 is slower than fp32.
    auto   bf16 on a CPU with bf16 units (or a CUDA GPU with bf16), else fp32 with a one-line
           warning on CPU: never a silent slowdown.

Set by `evaluate.search.precision` (evaluate stage, and the exported pyfunc's default),
`nmt translate --precision`, and `NMT_PRECISION` when serving (`nmt.serving`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from nmt import precision as hw
from nmt.config import DECODE_PRECISIONS, ConfigError
from nmt.row_buckets import bucket_linears_
from nmt.shortlist import ShortlistModel

log = logging.getLogger(__name__)

KEY = "evaluate.search.precision"


def _error(key: str, message: str) -> ValueError:
    return ConfigError(key, message) if key == KEY else ValueError(f"{key}: {message}")


def resolve_decode_precision(precision: str, device: str | torch.device = "cpu",
                             key: str = KEY) -> str:
    """The decoding precision, 'fp32' or 'bf16', for `precision` (auto | fp32 | bf16) on `device`.

    Args:
        precision: the requested setting.
        device: where the model decodes ('cpu', 'cuda', ...).
        key: the setting's name in messages (`--precision`, `NMT_PRECISION`, ...).
    Raises:
        ConfigError (key `evaluate.search.precision`) or ValueError (other keys): an unknown
        value, or bf16 asked for where it would be emulated.
    """
    if precision not in DECODE_PRECISIONS:
        raise _error(key, f"must be one of {', '.join(DECODE_PRECISIONS)}, got "
                               f"{precision!r}")
    kind = torch.device(device).type
    if precision == "fp32":
        return precision
    if kind == "cuda":
        ok = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not ok:
            raise _error(key, "'bf16': this GPU has no bf16; use fp32 or auto")
        return "bf16" if ok else "fp32"
    if kind != "cpu":
        if precision == "bf16":
            raise _error(key, f"'bf16': not supported on {kind}; use fp32 or auto")
        return "fp32"
    if hw.cpu_bf16_flags():
        return "bf16"
    if precision == "bf16":
        raise _error(key, f"'bf16' needs a CPU with bf16 units ({' or '.join(hw.BF16_FLAGS)}"
                               f" in lscpu flags); this CPU ({hw.cpu_name()}) has neither, so bf16 "
                               "would be emulated and slower than fp32; use fp32 or auto")
    log.warning("%s auto: this CPU (%s) has no bf16 units (%s), decoding in fp32", key,
                hw.cpu_name(), " or ".join(hw.BF16_FLAGS))
    return "fp32"


def bf16_copy(model: nn.Module) -> nn.Module:
    """A bf16 copy of `model` for decoding (eval mode); `model` itself is not changed. Its
    linear layers pad their rows to a few sizes (`nmt.row_buckets`: fewer oneDNN kernel builds
    on CPU, the same results)."""
    return bucket_linears_(copy.deepcopy(model).to(torch.bfloat16).eval())


@dataclass(frozen=True)
class _Fp32State:
    """A decoder state whose `enc_out` reads as fp32: the searches take the dtype of their score
    and attention buffers from it, and a bf16 model's encoder outputs are bf16."""

    inner: Any

    @property
    def mask(self) -> Tensor:
        return cast(Tensor, self.inner.mask)

    @property
    def enc_out(self) -> Tensor:
        return cast(Tensor, self.inner.enc_out).float()

    def index_select(self, idx: Tensor) -> _Fp32State:
        return _Fp32State(self.inner.index_select(idx))

    def reorder(self, idx: Tensor) -> _Fp32State:
        return _Fp32State(self.inner.reorder(idx))


class Fp32LogProbs(nn.Module):
    """A step model for bf16 decoding: log-softmax, scores and attention in fp32.

    A bf16 model's output layer yields bf16 logits, and a log-softmax in bf16 keeps only
    about 3 significant digits; the step is recomputed through the model's `decoder.embed`,
    `decoder.step` and `decoder.logits` (the RNN `Decoder` and the `TransformerDecoder` share
    them) and normalised in fp32 (a `ShortlistModel` normalises in fp32 itself).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.inner = model

    def encode(self, src: Tensor, src_lengths: Tensor) -> Any:
        return self.inner.encode(src, src_lengths)

    def init_state(self, enc: Any) -> _Fp32State:
        return _Fp32State(self.inner.init_state(enc))

    def step(self, state: _Fp32State, prev: Tensor) -> tuple[Tensor, _Fp32State, Tensor]:
        if isinstance(self.inner, ShortlistModel):
            log_probs, new_state, weights = self.inner.step(state.inner, prev)
            return log_probs, _Fp32State(new_state), weights.float()
        decoder = self.inner.decoder
        features, new_state, weights = decoder.step(state.inner, decoder.embed(prev))
        log_probs = decoder.logits(features).float().log_softmax(dim=-1)
        return log_probs, _Fp32State(new_state), weights.float()
