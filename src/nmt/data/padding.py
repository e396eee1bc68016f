"""Padding of id sequences into model inputs: torch and numpy only (no Lightning).

Training, validation BLEU, evaluation, export and serving all build sources with `pad_sources`,
so what the model sees cannot drift between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# relative: shipped with the portable export, outside the `nmt` package (nmt.export.programs)
from ..specials import BOS_ID, EOS_ID, PAD_ID


def pad_sources(seqs: Sequence[np.ndarray | Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Source ids -> (src (B, S) long with EOS appended then PAD, src_lengths (B,) long).

    Training, validation BLEU, evaluation and export must all build sources with this function.
    """
    lengths = np.fromiter((len(s) + 1 for s in seqs), dtype=np.int64, count=len(seqs))
    out = np.full((len(seqs), int(lengths.max(initial=1))), PAD_ID, dtype=np.int64)
    for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
        out[row, : n - 1] = seq
        out[row, n - 1] = EOS_ID
    return torch.from_numpy(out), torch.from_numpy(lengths)


def pad_targets(seqs: Sequence[np.ndarray]) -> Tensor:
    """Target ids -> (B, T + 1) long: BOS + ids + EOS, PAD after."""
    width = max((len(s) for s in seqs), default=0) + 2
    out = np.full((len(seqs), width), PAD_ID, dtype=np.int64)
    out[:, 0] = BOS_ID
    for row, seq in enumerate(seqs):
        out[row, 1 : len(seq) + 1] = seq
        out[row, len(seq) + 1] = EOS_ID
    return torch.from_numpy(out)
