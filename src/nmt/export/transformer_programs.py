"""Portable export of a `Transformer`: encoder and decoder-step programs over its KV-cache state.

    encoder.pt2        (src (B, S), src_lengths (B,)) -> (self_k, self_v, enc_out, mask,
                       cross_k, cross_v): `TransformerState`'s fields, the self-attention cache
                       empty (B, L, 0, D)
    decoder_step.pt2   (prev (N,), *state) -> (log_probs (N, V), self_k, self_v (N, L, T + 1, D),
                       attention (N, S))

The cache is explicit tensors with a dynamic target length; every field has its rows on dim 0,
and the first two (the cache) are the ones a step returns (`TRANSFORMER_LAYOUT`, runner.json
"state"), so the shipped runner and search drive these programs unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import Dim

from nmt.export.runner import ENCODER_FILE, STEP_FILE
from nmt.model.transformer import STATE_FIELDS, Transformer, TransformerState
from nmt.specials import BOS_ID

TRANSFORMER_LAYOUT = {"names": list(STATE_FIELDS), "row_dims": [0] * len(STATE_FIELDS),
                      "stepped": 2}


class TransformerEncoderProgram(nn.Module):
    """encode + init_state as one exportable function returning the state's fields."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, ...]:
        """src (B, S) long, src_lengths (B,) long -> the fields of `TransformerState`."""
        state = self.model.init_state(self.model.encode(src, src_lengths))
        return tuple(getattr(state, name) for name in STATE_FIELDS)


class TransformerStepProgram(nn.Module):
    """`Transformer.step` over the field tuple of `TransformerEncoderProgram`."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, prev: Tensor, self_k: Tensor, self_v: Tensor, enc_out: Tensor,
                mask: Tensor, cross_k: Tensor, cross_v: Tensor) -> tuple[Tensor, ...]:
        """prev (N,) + state (N rows) -> (log_probs (N, V), self_k, self_v, weights (N, S))."""
        state = TransformerState(self_k, self_v, enc_out, mask, cross_k, cross_v)
        log_probs, new, weights = self.model.step(state, prev)
        return log_probs, new.self_k, new.self_v, weights


def export_transformer_programs(model: Transformer, out_dir: Path) -> None:
    """torch.export both programs with dynamic batch, source length and target length."""
    model = model.eval()
    src = torch.tensor([[5, 6, 7, 8, 3], [9, 10, 3, 0, 0], [11, 3, 0, 0, 0]])
    lengths = torch.tensor([5, 3, 2])
    batch, seq = Dim("batch", min=1, max=4096), Dim("src_len", min=1, max=4096)
    trg = Dim("trg_len", min=0, max=4096)
    with torch.no_grad():
        enc = torch.export.export(TransformerEncoderProgram(model), (src, lengths),
                                  dynamic_shapes=({0: batch, 1: seq}, {0: batch}))
        state = model.init_state(model.encode(src, lengths))
        for _ in range(2):  # a cache of T = 2 positions, so T is not specialised to 0 or 1
            _, state, _ = model.step(state, torch.full((3,), BOS_ID))
        cache = {0: batch, 2: trg}
        enc_side = {0: batch, 1: seq}
        per_layer = {0: batch, 2: seq}
        step = torch.export.export(
            TransformerStepProgram(model),
            (torch.full((3,), BOS_ID), *(getattr(state, n) for n in STATE_FIELDS)),
            dynamic_shapes=({0: batch}, cache, cache, enc_side, enc_side, per_layer, per_layer))
    torch.export.save(enc, out_dir / ENCODER_FILE)
    torch.export.save(step, out_dir / STEP_FILE)
