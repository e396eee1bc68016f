"""Row buckets for bf16 matrix products on CPU: few shapes, so oneDNN builds few kernels.

PyTorch runs a bf16 `linear` on CPU through oneDNN, which builds (JIT-compiles) a kernel for
every new shape the first time it sees it and keeps it in a cache. Decoding gives nearly every
step a new row count (sentences leave the batch as they finish; the encoder sees batch x source
length rows), so a one-shot decode such as the evaluate stage's pays that build again and
again. Measured on a 2-core Xeon with AMX (torch 2.13.0+cpu): a (M, 256) x (256, 768) bf16
product takes 0.7 ms the first time at a new M and 0.05-0.09 ms after; fp32 takes 0.13 ms
either way (no per-shape build), so only bf16 is bucketed.

`bucket_rows` rounds a row count up to one of a few sizes: exact up to 8 (one sentence: 1 row,
then the beam's 5), then multiples of 16 up to 256 and eight sizes per doubling above (at most
1/8 extra rows). `bucketed_linear` pads the rows with zeros, multiplies and drops the padding:
every row of a matrix product depends only on itself, so the result is the same bit for bit
(tests/unit/test_row_buckets.py); only the kernel builds go. Side by side on that Xeon
(test split, bf16, a fresh process per run as in the evaluate stage): greedy 809-814 ->
1,000-1,044 sentences/s, beam 5 440-448 -> 466-477, the same outputs.

At a handful of rows a bf16 kernel is slower than an fp32 one (on that Xeon, a decoding step's
17 products at 5 rows: 0.63 ms in bf16, 0.44 in fp32), so `BucketedLinear` multiplies at most
`FP32_UP_TO` rows (one sentence in beam 5) in fp32, on an fp32 copy of its bf16 weights made at
the first such call: the products of bf16 values are exact in fp32 and the result is rounded to
bf16 once, so it differs from the bf16 kernel's at most in that last rounding (one sentence
through `nmt serve`: p50 19.2 -> 16.2-16.7 ms with the other changes of that day). The copy is
made once: a decoding copy's weights do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXACT_UP_TO = 8  # row counts kept as they are (one sentence: 1, then beam 5)
MIN_STEP = 16  # bucket width at small row counts
STEPS_PER_DOUBLING = 8  # above 16 * 16 rows: buckets of 1/8 of the power of two below
FP32_UP_TO = 8  # BucketedLinear: bf16 products of at most this many rows run in fp32


def bucket_rows(rows: int) -> int:
    """The bucket (>= rows) a product with `rows` rows is padded to."""
    if rows <= EXACT_UP_TO:
        return rows
    step = max(MIN_STEP, (1 << (rows.bit_length() - 1)) // STEPS_PER_DOUBLING)
    return -(-rows // step) * step


def bucketed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` for x (..., K), with the rows padded to `bucket_rows` for a
    bf16 product on CPU (the same result bit for bit); anything else is a plain `F.linear`."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.size(-1))
    rows = flat.size(0)
    padded = bucket_rows(rows)
    if padded != rows:
        flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.size(1))])
    return F.linear(flat, weight, bias)[:rows].view(*x.shape[:-1], weight.size(0))


class BucketedLinear(nn.Linear):
    """An `nn.Linear` whose bf16 CPU products go through `bucketed_linear`; products of at most
    `FP32_UP_TO` rows run in fp32 on the same (bf16-valued) weights instead."""

    _fp32: tuple[Tensor, Tensor | None] | None = None

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if (weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
                and x.numel() <= FP32_UP_TO * x.size(-1)):
            if self._fp32 is None:
                self._fp32 = (weight.detach().float(),
                              None if self.bias is None else self.bias.detach().float())
            return F.linear(x.float(), *self._fp32).to(x.dtype)
        return bucketed_linear(x, weight, self.bias)


def bucket_linears_(module: nn.Module) -> nn.Module:
    """In place: every `nn.Linear` in `module` becomes a `BucketedLinear` (same parameters);
    returns `module`. For decoding copies only (`nmt.decode_precision.bf16_copy`)."""
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = BucketedLinear
    return module
