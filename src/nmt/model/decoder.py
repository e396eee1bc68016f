"""Attentional RNN decoder with one step function shared by training and search.

Per target position (Luong et al., 2015):
    h_t  = RNN([emb(y_{t-1}); h~_{t-1} if input feeding], h_{t-1})
    c_t  = attention(h_t, encoder outputs)
    h~_t = tanh(W_c [c_t; h_t])            (W_c: (H_enc + H_dec) -> emb_dim, so it can be tied)
    p_t  = softmax(W_out dropout(h~_t) + b)
Bahdanau attention queries with the previous state instead and feeds c_t into the RNN:
    c_t = attention(h_{t-1}), h_t = RNN([emb(y_{t-1}); c_t; h~_{t-1} if input feeding], h_{t-1}).
Without attention (`none`) h~_t = tanh(W_c h_t): a plain encoder-decoder.

With Luong attention (or none) and no input feeding, teacher forcing runs the RNN over the whole
target in one call and attends on all positions with one bmm (`fast_path`); otherwise it loops
over positions calling `step`, the same function the search calls.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from nmt.model.attention import AttentionKind, build_attention
from nmt.model.encoder import EncoderOutput, RnnKind, make_rnn
from nmt.specials import PAD_ID

# attentional vectors (B, T, E), attention weights (B, T, S), new hidden and cell (L, B, H_dec)
_BlockOut = tuple[Tensor, Tensor, Tensor, Tensor | None]


class DecoderState(NamedTuple):
    """Decoder state between steps; tensors only, so encoder + step can be exported.

    hidden: (L, B, H_dec) RNN hidden state.
    cell: (L, B, H_dec) LSTM cell state, None for a GRU.
    attn_vec: (B, E) previous attentional vector h~ (zeros before the first step).
    enc_out: (B, S, H_enc) encoder outputs (attention values).
    mask: (B, S) True on real source tokens.
    keys: (B, S, K) attention keys precomputed from enc_out (enc_out itself for dot / none).
    """

    hidden: Tensor
    cell: Tensor | None
    attn_vec: Tensor
    enc_out: Tensor
    mask: Tensor
    keys: Tensor

    def index_select(self, idx: Tensor) -> DecoderState:
        """Rows `idx` (N,) of every field: beam expansion or any batch reshuffle."""
        return DecoderState(
            hidden=self.hidden.index_select(1, idx),
            cell=None if self.cell is None else self.cell.index_select(1, idx),
            attn_vec=self.attn_vec.index_select(0, idx),
            enc_out=self.enc_out.index_select(0, idx),
            mask=self.mask.index_select(0, idx),
            keys=self.keys.index_select(0, idx),
        )

    def reorder(self, idx: Tensor) -> DecoderState:
        """Like `index_select` but copies only the per-hypothesis fields (hidden, cell, attn_vec).

        Valid only when row `idx[i]` has the same source sentence as row i, as in beam search
        reordering within a sentence; the encoder-side fields are then already right.
        """
        return self._replace(
            hidden=self.hidden.index_select(1, idx),
            cell=None if self.cell is None else self.cell.index_select(1, idx),
            attn_vec=self.attn_vec.index_select(0, idx),
        )


class Decoder(nn.Module):
    """Target embedding, bridge, RNN, attention, attentional layer and output projection."""

    def __init__(self, *, rnn: RnnKind, vocab_size: int, emb_dim: int, enc_dim: int,
                 hidden: int, layers: int, attention: AttentionKind, input_feeding: bool,
                 dropout: float, tie_embeddings: bool) -> None:
        super().__init__()
        if input_feeding and attention == "none":
            raise ValueError("input_feeding: needs an attention other than 'none'")
        self.rnn_kind = rnn
        self.layers = layers
        self.hidden = hidden  # H_dec
        self.emb_dim = emb_dim
        self.input_feeding = input_feeding
        self.additive = attention == "bahdanau"
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.attention = build_attention(attention, hidden, enc_dim)
        rnn_in = emb_dim + (enc_dim if self.additive else 0) + (emb_dim if input_feeding else 0)
        self.rnn = make_rnn(rnn, rnn_in, hidden, layers, dropout)
        self.bridge_hidden = nn.Linear(enc_dim, layers * hidden)
        self.bridge_cell = nn.Linear(enc_dim, layers * hidden) if rnn == "lstm" else None
        context_dim = 0 if self.attention is None else enc_dim
        self.combine = nn.Linear(context_dim + hidden, emb_dim, bias=False)  # W_c
        self.output = nn.Linear(emb_dim, vocab_size)
        if tie_embeddings:
            self.output.weight = self.embedding.weight

    @property
    def fast_path(self) -> bool:
        """True when teacher forcing runs the RNN over all positions in one call."""
        return not (self.input_feeding or self.additive)

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        """Bridge the encoder's final state (B, H_enc) to the decoder's (L, B, H_dec)."""
        batch = enc.hidden.size(0)
        keys = enc.outputs if self.attention is None else self.attention.precompute_keys(
            enc.outputs)
        cell = None
        if self.bridge_cell is not None and enc.cell is not None:
            cell = self._bridge(self.bridge_cell, enc.cell)
        return DecoderState(
            hidden=self._bridge(self.bridge_hidden, enc.hidden),
            cell=cell,
            attn_vec=enc.outputs.new_zeros(batch, self.emb_dim),
            enc_out=enc.outputs,
            mask=enc.mask,
            keys=keys,
        )

    def _bridge(self, layer: nn.Linear, final: Tensor) -> Tensor:
        batch = final.size(0)
        state = torch.tanh(layer(final)).view(batch, self.layers, self.hidden)  # (B, L, H_dec)
        return state.transpose(0, 1).contiguous()  # (L, B, H_dec)

    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids (B,) or (B, T) -> embeddings (B, E) or (B, T, E), with dropout."""
        return self.dropout(self.embedding(tokens))

    def logits(self, attn_vec: Tensor) -> Tensor:
        """Attentional vectors (..., E) -> unnormalised scores over the vocabulary (..., V)."""
        return self.output(self.dropout(attn_vec))

    def step(self, state: DecoderState, emb: Tensor) -> tuple[Tensor, DecoderState, Tensor]:
        """One target position for every row.

        Args:
            state: state after the previous position (rows B).
            emb: embedded previous target tokens, shape (B, E).
        Returns:
            attentional vector h~ (B, E), the new state, attention weights (B, S).
        """
        x = emb[:, None, :]  # (B, 1, E)
        if self.input_feeding:
            x = torch.cat([x, state.attn_vec[:, None, :]], dim=-1)  # (B, 1, 2E)
        if self.additive:
            attn_vec, weights, hidden, cell = self._bahdanau(x, state)
        else:
            attn_vec, weights, hidden, cell = self._luong(x, state)
        attn_vec = attn_vec[:, 0]  # (B, E)
        new_state = state._replace(hidden=hidden, cell=cell, attn_vec=attn_vec)
        return attn_vec, new_state, weights[:, 0]

    def forward(self, state: DecoderState, emb: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing over all target positions.

        Args:
            state: initial state from `init_state` (rows B).
            emb: embedded decoder inputs (BOS y_1 ... y_{T-1}), shape (B, T, E).
        Returns:
            attentional vectors (B, T, E) and attention weights (B, T, S).
        """
        if self.fast_path:
            attn_vecs, weights, _, _ = self._luong(emb, state)
            return attn_vecs, weights
        vecs, weights = [], []
        for t in range(emb.size(1)):
            attn_vec, state, w = self.step(state, emb[:, t])
            vecs.append(attn_vec)
            weights.append(w)
        return torch.stack(vecs, dim=1), torch.stack(weights, dim=1)

    def _luong(self, x: Tensor, state: DecoderState) -> _BlockOut:
        """RNN over T positions, then attention with every output as query (T = 1 in `step`)."""
        out, hidden, cell = self._run_rnn(x, state)  # (B, T, H_dec)
        if self.attention is None:
            weights = out.new_zeros(out.size(0), out.size(1), state.enc_out.size(1))
            return torch.tanh(self.combine(out)), weights, hidden, cell
        context, weights = self.attention(out, state.keys, state.enc_out, state.mask)
        attn_vec = torch.tanh(self.combine(torch.cat([context, out], dim=-1)))  # (B, T, E)
        return attn_vec, weights, hidden, cell

    def _bahdanau(self, x: Tensor, state: DecoderState) -> _BlockOut:
        """Attention with the previous top-layer state as query, context fed into the RNN."""
        assert self.attention is not None
        query = state.hidden[-1][:, None, :]  # (B, 1, H_dec)
        context, weights = self.attention(query, state.keys, state.enc_out, state.mask)
        out, hidden, cell = self._run_rnn(torch.cat([x, context], dim=-1), state)  # (B, 1, H)
        attn_vec = torch.tanh(self.combine(torch.cat([context, out], dim=-1)))  # (B, 1, E)
        return attn_vec, weights, hidden, cell

    def _run_rnn(self, x: Tensor, state: DecoderState) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.rnn_kind == "lstm":
            assert state.cell is not None
            out, (hidden, cell) = self.rnn(x, (state.hidden, state.cell))
            return out, hidden, cell
        out, hidden = self.rnn(x, state.hidden)
        return out, hidden, None
