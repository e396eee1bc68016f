"""Transformer encoder-decoder (Vaswani et al., 2017; pre-norm) behind the search's step protocol.

`Transformer` has the same interface as `nmt.model.Seq2Seq`: `forward(src, src_lengths, trg_in)`
returns teacher-forced logits for the loss in `nmt.lit_module`; `encode`, `init_state` and `step`
are the `StepModel` protocol of `nmt.model.search`, so greedy and beam search, the lexical
shortlist (`nmt.shortlist`, through `decoder.embed`, `decoder.step` and `decoder.output`),
evaluation and serving run it unchanged.

Incremental decoding caches, per decoder layer, the self-attention keys and values of the
target positions so far and the cross-attention projections of the encoder output
(`TransformerState`); a step runs one position against them, so it costs O(T) instead of
recomputing the prefix. The encoder-side fields are kept once per sentence, not once per
hypothesis: the K hypotheses of a sentence are K consecutive rows (a group), and their
cross-attention runs as K queries over the sentence's keys (one (K, S) product per head instead
of K (1, S) ones). Beam expansion then copies no encoder data, and dropping a finished sentence
copies its encoder rows once, not K times (`TransformerState.index_select`).

Embeddings are scaled by sqrt(D) before the positions are added; with `tie_embeddings` the
decoder's input embedding is the output projection's weight (source and target vocabularies
are separate, so the encoder keeps its own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from nmt.config import ModelConfig
from nmt.model.seq2seq import EncoderDecoder
from nmt.model.shapes import check_shapes
from nmt.model.transformer_layers import (
    DecoderLayer,
    EncoderLayer,
    PositionKind,
    Positions,
    dropout_module,
)
from nmt.specials import PAD_ID


class TransformerEncoderOutput(NamedTuple):
    """outputs (B, S, D) after the final LayerNorm; mask (B, S) True on real source tokens."""

    outputs: Tensor
    mask: Tensor


@dataclass(frozen=True)
class TransformerState:
    """Decoder state of N rows (the search's `SearchState`); every field has rows on dim 0.

    self_k, self_v: (R, L, T, D) self-attention keys/values of the T positions decoded so far.
    rows: (N,) long, row i's cache is row rows[i] of self_k / self_v; None: R = N, row i is i.
        Row selections only compose this index; the next step applies it while it copies the
        cache into the cache one position longer (`TransformerDecoder.step`), so a beam
        reordering costs no copy of its own.
    enc_out: (E, S, D) encoder outputs; mask: (E, S) True on real source tokens.
    cross_k, cross_v: (E, L, S, D) each decoder layer's projections of enc_out.
    The E encoder entries serve the N rows in groups of `group` = N / E consecutive rows (the
    hypotheses of one sentence); E = N (group 1) is the plain one-row-per-entry state, as the
    encoder and the export build it.
    """

    self_k: Tensor
    self_v: Tensor
    enc_out: Tensor
    mask: Tensor
    cross_k: Tensor
    cross_v: Tensor
    rows: Tensor | None = None

    @property
    def position(self) -> int:
        """Index of the next target position (T)."""
        return self.self_k.size(2)

    @property
    def num_rows(self) -> int:
        """N, the decoder rows (hypotheses)."""
        return self.self_k.size(0) if self.rows is None else self.rows.numel()

    @property
    def group(self) -> int:
        """Rows per encoder entry (N / E)."""
        return self.num_rows // max(self.mask.size(0), 1)

    def cache(self) -> tuple[Tensor, Tensor]:
        """The self-attention keys and values of the N rows, (N, L, T, D) each."""
        if self.rows is None:
            return self.self_k, self.self_v
        return self.self_k.index_select(0, self.rows), self.self_v.index_select(0, self.rows)

    def index_select(self, idx: Tensor) -> TransformerState:
        """Rows `idx` (M,): beam expansion or dropping finished sentences.

        The encoder fields follow the entries of the selected rows: the new group is the
        largest size that splits `idx` into runs of rows from one entry (K for the search's
        selections; 1, one entry per row, for any other), and only the entries of those runs
        are copied (none when they are all the entries in order, as in beam expansion).
        """
        entry = idx // self.group
        group = _run_group(entry)
        entries = entry[::group]
        encoder = {f: getattr(self, f) for f in ENCODER_FIELDS}
        if not (entries.numel() == self.mask.size(0)
                and torch.equal(entries, torch.arange(entries.numel(), device=idx.device))):
            encoder = {f: t.index_select(0, entries) for f, t in encoder.items()}
        return TransformerState(self_k=self.self_k, self_v=self.self_v, rows=self._rows(idx),
                                **encoder)

    def reorder(self, idx: Tensor) -> TransformerState:
        """Rows `idx` of the per-hypothesis cache only; row idx[i] shares row i's source."""
        return replace(self, rows=self._rows(idx))

    def _rows(self, idx: Tensor) -> Tensor:
        """Cache rows of the selected rows `idx`."""
        return idx if self.rows is None else self.rows.index_select(0, idx)


STATE_FIELDS = ("self_k", "self_v", "enc_out", "mask", "cross_k", "cross_v")  # as exported
ENCODER_FIELDS = STATE_FIELDS[2:]


def _run_group(entry: Tensor) -> int:
    """The largest g such that every g consecutive values of `entry` (M,) are equal, g | M."""
    if entry.numel() == 0:
        return 1
    _, counts = torch.unique_consecutive(entry, return_counts=True)
    return math.gcd(*counts.tolist())


class _Stack(nn.Module):
    """Token embedding scaled by sqrt(D), plus positions, plus dropout; then L layers of
    `layer_type` and a final LayerNorm (the encoder and the decoder differ only in the layer)."""

    layer_type: type[EncoderLayer] | type[DecoderLayer]

    def __init__(self, *, vocab_size: int, d_model: int, layers: int, heads: int, ff_dim: int,
                 dropout: float, attention_dropout: float, activation_dropout: float,
                 positions: PositionKind, max_positions: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
        self.positions = Positions(kind=positions, d_model=d_model, max_positions=max_positions)
        self.scale = d_model ** 0.5
        self.dropout = dropout_module(dropout)
        self.layers = nn.ModuleList(
            self.layer_type(d_model=d_model, heads=heads, ff_dim=ff_dim, dropout=dropout,
                            attention_dropout=attention_dropout,
                            activation_dropout=activation_dropout)
            for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def add_positions(self, emb: Tensor, start: int) -> Tensor:
        """Scaled embeddings (B, T, D) of positions start.. -> with positions and dropout."""
        return self.dropout(emb + self.positions(start, emb.size(1), emb))


class TransformerEncoder(_Stack):
    """Embedding + positions, L pre-norm self-attention layers, final LayerNorm."""

    layer_type = EncoderLayer

    def forward(self, src: Tensor, mask: Tensor) -> Tensor:
        """src (B, S) long, mask (B, S) -> outputs (B, S, D)."""
        x = self.add_positions(self.embedding(src) * self.scale, 0)  # (B, S, D)
        for layer in self.layers:
            x = layer(x, mask[:, None, :])
        return self.norm(x)


class TransformerDecoder(_Stack):
    """Embedding + positions, L pre-norm decoder layers, final LayerNorm, output projection.

    `embed`, `step`, `logits` and `output` mirror `nmt.model.decoder.Decoder`, which is what
    `nmt.shortlist.ShortlistModel` calls.
    """

    layer_type = DecoderLayer

    def __init__(self, *, vocab_size: int, d_model: int, layers: int, heads: int, ff_dim: int,
                 dropout: float, attention_dropout: float, activation_dropout: float,
                 positions: PositionKind, max_positions: int, tie_embeddings: bool) -> None:
        super().__init__(vocab_size=vocab_size, d_model=d_model, layers=layers, heads=heads,
                         ff_dim=ff_dim, dropout=dropout, attention_dropout=attention_dropout,
                         activation_dropout=activation_dropout, positions=positions,
                         max_positions=max_positions)
        self.output = nn.Linear(d_model, vocab_size)
        if tie_embeddings:
            self.output.weight = self.embedding.weight

    def init_state(self, enc: TransformerEncoderOutput) -> TransformerState:
        """Empty self-attention cache, cross-attention keys/values of every layer."""
        cross = [layer.cross_attn.project_kv(enc.outputs) for layer in self.layers]
        batch, _, width = enc.outputs.shape
        empty = enc.outputs.new_zeros(batch, len(self.layers), 0, width)  # (B, L, 0, D)
        return TransformerState(
            self_k=empty, self_v=empty, enc_out=enc.outputs, mask=enc.mask,
            cross_k=torch.stack([k for k, _ in cross], dim=1),  # (B, L, S, D)
            cross_v=torch.stack([v for _, v in cross], dim=1))

    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids (B,) or (B, T) -> scaled embeddings (B, D) or (B, T, D) (no positions)."""
        return self.embedding(tokens) * self.scale

    def logits(self, features: Tensor) -> Tensor:
        """Final-norm outputs (..., D) -> unnormalised scores (..., V)."""
        return self.output(features)

    def step(self, state: TransformerState,
             emb: Tensor) -> tuple[Tensor, TransformerState, Tensor]:
        """One target position for every row: emb (N, D) -> features (N, D), state, weights (N, S).

        weights are the last layer's cross-attention weights averaged over heads. The new
        cache (N, L, T + 1, D) is allocated once and the layers write their position into it
        (`DecoderLayer.step`), so a step copies the cache once (applying the state's pending
        row selection on the way), not per layer and again to concatenate.
        """
        position, (_, layers, _, width) = state.position, state.self_k.shape
        rows = state.num_rows
        self_k = state.self_k.new_empty(rows, layers, position + 1, width)
        self_v = state.self_v.new_empty(rows, layers, position + 1, width)
        if state.rows is None:
            self_k[:, :, :position], self_v[:, :, :position] = state.self_k, state.self_v
        else:  # the pending row selection, applied by the copy itself
            torch.index_select(state.self_k, 0, state.rows, out=self_k[:, :, :position])
            torch.index_select(state.self_v, 0, state.rows, out=self_v[:, :, :position])
        x = self.add_positions(emb[:, None, :], position)  # (N, 1, D)
        src_allowed = state.mask[:, None, :]  # (N, 1, S)
        weights: Tensor | None = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, weights = layer.step(x, self_k[:, i], self_v[:, i], state.cross_k[:, i],
                                    state.cross_v[:, i], src_allowed, need_weights=i == last)
        assert weights is not None  # the last layer returns them
        return (self.norm(x)[:, 0], replace(state, self_k=self_k, self_v=self_v, rows=None),
                weights[:, 0])

    def forward(self, state: TransformerState, emb: Tensor,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Teacher forcing: emb (B, T, D) of BOS y_1 .. y_{T-1} -> features (B, T, D), and the
        last layer's cross-attention weights (B, T, S) only with `need_weights` (else None:
        training never reads them, and without them every attention runs the fused kernel);
        the causal mask makes position t see positions <= t only."""
        features, _, _, weights = self._run(state, emb, need_weights)
        return features, weights

    def _run(self, state: TransformerState, emb: Tensor, need_weights: bool = True
             ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor | None]:
        """T positions after the cached ones -> features, each layer's new keys and values
        (B, T, D) (left unstacked: training discards them), the last layer's cross-attention
        weights (B, T, S) (None without `need_weights`)."""
        x = self.add_positions(emb, state.position)  # (B, T, D)
        src_allowed = state.mask[:, None, :]  # (B, 1, S)
        cache_k, cache_v = state.cache()
        keys, values, weights = [], [], None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, k, v, weights = layer(x, cache_k[:, i], cache_v[:, i],
                                     state.cross_k[:, i], state.cross_v[:, i], src_allowed,
                                     need_weights=need_weights and i == last)
            keys.append(k)
            values.append(v)
        return self.norm(x), keys, values, weights


class Transformer(EncoderDecoder):
    """Transformer encoder-decoder with the `Seq2Seq` interface (forward, encode, init_state,
    step); plain PyTorch, no training-stack imports."""

    encoder: TransformerEncoder
    decoder: TransformerDecoder

    def __init__(self, encoder: TransformerEncoder, decoder: TransformerDecoder) -> None:
        super().__init__(encoder, decoder)

    def encode(self, src: Tensor, src_lengths: Tensor) -> TransformerEncoderOutput:
        """src (B, S) long (PAD after each sentence), src_lengths (B,) long in [1, S]."""
        self.check_source(src, src_lengths)
        mask = torch.arange(src.size(1), device=src.device)[None, :] < src_lengths[:, None]
        return TransformerEncoderOutput(self.encoder(src, mask), mask)

    def init_state(self, encoder_output: TransformerEncoderOutput) -> TransformerState:
        """Initial decoder state (rows B, empty cache) from the encoder output."""
        return self.decoder.init_state(encoder_output)

    def step(self, state: TransformerState,
             prev_tokens: Tensor) -> tuple[Tensor, TransformerState, Tensor]:
        """prev_tokens (N,) long (BOS_ID first) -> log_probs (N, V), new state, weights (N, S)."""
        check_shapes(("prev_tokens", prev_tokens, "N"), dims={"N": state.num_rows})
        features, state, weights = self.decoder.step(state, self.decoder.embed(prev_tokens))
        return self.decoder.logits(features).log_softmax(dim=-1), state, weights



def build_transformer(cfg: ModelConfig, src_vocab_size: int, trg_vocab_size: int) -> Transformer:
    """`model` params (arch transformer) -> an initialised `Transformer`."""
    tf = cfg.transformer
    sizes = dict(d_model=tf.d_model, layers=tf.layers, heads=tf.heads, ff_dim=tf.ff_dim,
                 dropout=tf.dropout, attention_dropout=tf.attention_dropout,
                 activation_dropout=tf.activation_dropout, positions=tf.positions,
                 max_positions=tf.max_positions)
    model = Transformer(TransformerEncoder(vocab_size=src_vocab_size, **sizes),
                        TransformerDecoder(vocab_size=trg_vocab_size,
                                           tie_embeddings=cfg.tie_embeddings, **sizes))
    init_transformer(model)
    return model


def init_transformer(model: Transformer) -> None:
    """Xavier-uniform matrices, zero biases, LayerNorm (1, 0), embeddings N(0, D^-0.5).

    Embeddings of norm ~1 times sqrt(D) match the positions' scale; tied, they keep the initial
    logits O(1). Learned position tables get N(0, 0.02), PAD rows zero.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            if module.weight is not model.decoder.embedding.weight:
                nn.init.xavier_uniform_(module.weight)
    for part in (model.encoder, model.decoder):
        nn.init.normal_(part.embedding.weight, std=part.embedding.embedding_dim ** -0.5)
        part.embedding.weight.data[PAD_ID].zero_()
        if part.positions.table is not None:
            nn.init.normal_(part.positions.table.weight, std=0.02)
