"""RNN encoder over packed source sequences.

The encoder embeds the source, runs a (bi)directional LSTM or GRU over it with
`pack_padded_sequence`, so padding costs no work and never leaks into the backward direction,
and returns per-token outputs, the padding mask and the final state of the top layer.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmt.specials import PAD_ID

RnnKind = Literal["lstm", "gru"]


def make_rnn(kind: RnnKind, input_size: int, hidden: int, layers: int, dropout: float,
             bidirectional: bool = False) -> nn.LSTM | nn.GRU:
    """Batch-first LSTM or GRU; inter-layer dropout only when there is more than one layer."""
    cls = nn.LSTM if kind == "lstm" else nn.GRU
    return cls(input_size, hidden, num_layers=layers, batch_first=True,
               dropout=dropout if layers > 1 else 0.0, bidirectional=bidirectional)


class EncoderOutput(NamedTuple):
    """What the decoder needs from the encoder.

    outputs: (B, S, H_enc) per-token states, 0 on padding; H_enc = hidden * directions.
    mask: (B, S) bool, True on real tokens.
    hidden: (B, H_enc) final hidden state of the top layer, directions concatenated.
    cell: (B, H_enc) final LSTM cell state of the top layer, or None for a GRU.
    """

    outputs: Tensor
    mask: Tensor
    hidden: Tensor
    cell: Tensor | None


class Encoder(nn.Module):
    """Embedding + multi-layer (bi)directional LSTM/GRU over packed sequences."""

    def __init__(self, *, rnn: RnnKind, vocab_size: int, emb_dim: int, hidden: int,
                 layers: int, bidirectional: bool, dropout: float) -> None:
        super().__init__()
        self.rnn_kind = rnn
        self.layers = layers
        self.directions = 2 if bidirectional else 1
        self.hidden = hidden
        self.out_dim = hidden * self.directions  # H_enc
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.rnn = make_rnn(rnn, emb_dim, hidden, layers, dropout, bidirectional)

    def forward(self, src: Tensor, src_lengths: Tensor, pack: bool = True) -> EncoderOutput:
        """Encode a padded batch.

        Args:
            src: token ids, shape (B, S), padded with PAD_ID after each sentence.
            src_lengths: real lengths, shape (B,), each in [1, S].
            pack: run the RNN on a packed sequence (exact for any padding). False runs it on
                the padded tensor, which torch.export can trace but which is exact only when
                no sentence is padded (every length == S, e.g. one sentence at a time).
        Returns:
            EncoderOutput with outputs (B, S, H_enc), mask (B, S), final hidden/cell (B, H_enc).
        """
        seq_len = src.size(1)
        emb = self.dropout(self.embedding(src))  # (B, S, E)
        if pack:
            packed = pack_padded_sequence(emb, src_lengths.cpu(), batch_first=True,
                                          enforce_sorted=False)
            packed_out, state = self.rnn(packed)
            outputs, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=seq_len)
        else:
            outputs, state = self.rnn(emb)  # (B, S, H_enc)
        hidden, cell = state if isinstance(state, tuple) else (state, None)
        positions = torch.arange(seq_len, device=src.device)
        mask = positions[None, :] < src_lengths[:, None]  # (B, S)
        return EncoderOutput(
            outputs=self.dropout(outputs),  # (B, S, H_enc)
            mask=mask,
            hidden=self._top_layer(hidden),
            cell=None if cell is None else self._top_layer(cell),
        )

    def _top_layer(self, state: Tensor) -> Tensor:
        """(layers * directions, B, H) -> (B, directions * H) for the top layer."""
        batch = state.size(1)
        top = state.view(self.layers, self.directions, batch, self.hidden)[-1]  # (D, B, H)
        return top.transpose(0, 1).reshape(batch, self.out_dim)
