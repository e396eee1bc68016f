"""Lexical shortlist: search scores only the target pieces likely for the sources at hand.

Built once from the training pairs by the `shortlist` stage (params `shortlist`): for every
source piece s, the `top_k` target pieces t seen in the most training pairs together with s
(highest p(t | s) = pairs holding s and t / pairs holding s; ties by id), plus the `frequent`
most frequent target pieces and the four specials. Decoding a batch computes the output layer
for the union of its sentences' lists only (about 2,900 of 8,000 pieces for 128 test sentences
with the defaults), so the output projection, log-softmax and top-k, most of a beam step, shrink
with it; each sentence is then scored over its own list (the rest of the union is masked), so a
sentence translates the same alone or in any batch. As in Marian's lexical shortlists the
log-softmax is taken over the shortlist, so scores differ slightly from full-vocabulary search;
the evaluate stage scores what users get.

`ShortlistModel` shows a model (`Seq2Seq` or `Transformer`) to `nmt.model.search` through a
shortlist: token ids in and out of `step` are positions in the sorted shortlist, whose first
four entries are the specials (so PAD/UNK/BOS/EOS keep their ids and the search needs no
change); `to_vocabulary` maps results back.

The file (`ModelDir.shortlist_file`, models/shortlist.npz) holds offsets (V_src + 1,), targets,
always, top_k, frequent and the vocab sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nmt.io import atomic_path
from nmt.model import SearchResult, Seq2Seq, Transformer
from nmt.model.search import SearchState
from nmt.row_buckets import bucketed_linear
from nmt.specials import SPECIAL_PIECES

NUM_SPECIALS = len(SPECIAL_PIECES)  # ids 0..3: PAD, UNK, BOS, EOS
_FIELDS = ("offsets", "targets", "always", "top_k", "frequent", "src_vocab_size",
           "trg_vocab_size")


class ShortlistError(ValueError):
    """A shortlist file is unreadable or does not fit the model."""


@dataclass(frozen=True)
class Shortlist:
    """Per source piece s, candidate target ids `targets[offsets[s]:offsets[s + 1]]`.

    always: sorted target ids every batch gets (specials + most frequent). top_k = 0 means the
    stage was told to build no shortlist: `enabled` is False and search uses the full vocabulary.
    """

    offsets: np.ndarray  # (V_src + 1,) int64
    targets: np.ndarray  # (offsets[-1],) int64
    always: np.ndarray  # (A,) int64, sorted
    top_k: int
    frequent: int
    src_vocab_size: int
    trg_vocab_size: int

    @property
    def enabled(self) -> bool:
        return self.top_k > 0

    def candidates(self, src: Tensor) -> Tensor:
        """Sorted target ids for a batch of source ids (B, S) (PAD/EOS included), long (N,)."""
        return torch.from_numpy(self._ids(np.unique(src.detach().cpu().numpy()))).long()

    def batch(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """Shortlist of a batch (B, S): the union `ids` (N,) and `allowed` (B, N), bool, True
        where ids[j] is on sentence b's own shortlist."""
        rows = src.detach().cpu().numpy().astype(np.int64)
        vocab = self.src_vocab_size
        row_of, col = np.nonzero((rows >= 0) & (rows < vocab))
        pairs = np.unique(row_of * vocab + rows[row_of, col])  # distinct (sentence, piece)
        row_of, piece = pairs // vocab, pairs % vocab
        starts, lengths = self.offsets[piece], self.offsets[piece + 1] - self.offsets[piece]
        # every pair's slice of `targets`, concatenated without a Python loop
        flat = np.arange(int(lengths.sum())) + np.repeat(starts - (np.cumsum(lengths) - lengths),
                                                         lengths)
        member = np.zeros((rows.shape[0], self.trg_vocab_size), dtype=bool)  # (B, V_trg)
        member[np.repeat(row_of, lengths), self.targets[flat]] = True
        member[:, self.always] = True
        ids = np.flatnonzero(member.any(axis=0)).astype(np.int64)
        return torch.from_numpy(ids).long(), torch.from_numpy(member[:, ids])

    def _ids(self, present: np.ndarray) -> np.ndarray:
        present = present[(present >= 0) & (present < self.src_vocab_size)]
        parts = [self.always] + [self.targets[self.offsets[s]:self.offsets[s + 1]]
                                 for s in present.tolist()]
        return np.unique(np.concatenate(parts)).astype(np.int64)

    def check_fits(self, src_vocab_size: int, trg_vocab_size: int, where: str) -> None:
        """Raise ShortlistError unless built for these vocabulary sizes."""
        if (self.src_vocab_size, self.trg_vocab_size) != (src_vocab_size, trg_vocab_size):
            raise ShortlistError(
                f"{where}: shortlist built for vocabularies {self.src_vocab_size}/"
                f"{self.trg_vocab_size} (source/target), the model has {src_vocab_size}/"
                f"{trg_vocab_size}; rebuild it with `dvc repro shortlist`")

    def save(self, path: Path | str) -> None:
        """Write the npz atomically (no pickle)."""
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            arrays = {name: np.asarray(getattr(self, name)) for name in _FIELDS}
            arrays["targets"] = arrays["targets"].astype(np.int32)  # half the size on disk
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: Path | str) -> Shortlist:
        """Read a file written by `save`; ShortlistError naming the file if it is not one."""
        try:
            with np.load(path, allow_pickle=False) as data:
                values = {name: data[name] for name in _FIELDS}
        except (OSError, ValueError, KeyError) as exc:
            raise ShortlistError(f"{path}: not a shortlist file ({exc}); rebuild it with "
                                 "`dvc repro shortlist`") from exc
        ints = {name: int(values[name]) for name in _FIELDS[3:]}
        return cls(offsets=values["offsets"].astype(np.int64),
                   targets=values["targets"].astype(np.int64),
                   always=values["always"].astype(np.int64), **ints)


def build_shortlist(src_seqs: Sequence[Sequence[int]], trg_seqs: Sequence[Sequence[int]],
                    src_vocab_size: int, trg_vocab_size: int, top_k: int,
                    frequent: int) -> Shortlist:
    """Count source/target piece co-occurrence over sentence pairs and keep the top lists.

    Args:
        src_seqs, trg_seqs: token ids of the training pairs (no BOS/EOS), same length.
        src_vocab_size, trg_vocab_size: vocabulary sizes (ids must be below them).
        top_k: target pieces per source piece (0: an empty, disabled shortlist).
        frequent: most frequent target pieces (by token count) added to every batch.
    """
    if len(src_seqs) != len(trg_seqs):
        raise ValueError(f"{len(src_seqs)} source but {len(trg_seqs)} target sequences")
    specials = np.arange(NUM_SPECIALS, dtype=np.int64)
    if top_k == 0:
        return Shortlist(np.zeros(src_vocab_size + 1, np.int64), np.zeros(0, np.int64), specials,
                         0, frequent, src_vocab_size, trg_vocab_size)
    src_unique = [np.unique(np.asarray(s, dtype=np.int64)) for s in src_seqs]
    trg_unique = [np.unique(np.asarray(t, dtype=np.int64)) for t in trg_seqs]
    pair_keys = np.concatenate([(s[:, None] * trg_vocab_size + t[None, :]).ravel()
                                for s, t in zip(src_unique, trg_unique, strict=True)] or
                               [np.zeros(0, np.int64)])
    keys, counts = np.unique(pair_keys, return_counts=True)  # pairs holding both s and t
    src_of, trg_of = keys // trg_vocab_size, keys % trg_vocab_size
    # p(t | s) orders like the pair count within one s: sort by s, count desc, t
    order = np.lexsort((trg_of, -counts, src_of))
    src_of, trg_of = src_of[order], trg_of[order]
    starts = np.searchsorted(src_of, np.arange(src_vocab_size))
    ends = np.minimum(np.searchsorted(src_of, np.arange(src_vocab_size), side="right"),
                      starts + top_k)
    targets = np.concatenate([trg_of[a:b] for a, b in zip(starts, ends, strict=True)])
    offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
    token_counts = np.bincount(np.concatenate([np.asarray(t, dtype=np.int64) for t in trg_seqs]
                                              or [np.zeros(0, np.int64)]),
                               minlength=trg_vocab_size)
    top = np.argsort(-token_counts, kind="stable")[:frequent]
    always = np.union1d(specials, top[token_counts[top] > 0])
    return Shortlist(offsets, targets, always, top_k, frequent, src_vocab_size, trg_vocab_size)


def write_shortlist(processed_dir: Path | str, out: Path | str, top_k: int,
                    frequent: int) -> Shortlist:
    """The `shortlist` stage: build from the train split of `vectorize`'s folder, save to `out`."""
    from nmt.data.vectorize import load_split, tokenizers_dir  # pandas: not needed to decode
    from nmt.data.vocab import load_tokenizers

    processed_dir = Path(processed_dir)
    src_tok, trg_tok = load_tokenizers(tokenizers_dir(processed_dir))
    train = load_split(processed_dir, "train")
    shortlist = build_shortlist(train.src, train.trg, src_tok.vocab_size, trg_tok.vocab_size,
                                top_k, frequent)
    shortlist.save(out)
    return shortlist


@dataclass(frozen=True)
class _RowState:
    """A model's decoder state (`SearchState`) plus each row's sentence (`sentence`, (rows,)
    long), carried through the searches' row selections so a step can apply each sentence's
    own shortlist. Works for any architecture's state (`DecoderState`, `TransformerState`)."""

    inner: SearchState
    sentence: Tensor

    @property
    def mask(self) -> Tensor:
        return self.inner.mask

    @property
    def enc_out(self) -> Tensor:
        return self.inner.enc_out

    def index_select(self, idx: Tensor) -> _RowState:
        return _RowState(self.inner.index_select(idx), self.sentence[idx])

    def reorder(self, idx: Tensor) -> _RowState:
        return _RowState(self.inner.reorder(idx), self.sentence[idx])


class ShortlistModel(nn.Module):
    """`model` with its output layer cut to the target ids `ids` (sorted, specials first).

    Quacks like the model for `nmt.model.search` (encode, init_state, step); `weight` and
    `bias` are the full output layer's fp32 parameters (V, E) and (V,) (kept aside when the
    model itself is int8). With `allowed` (B, N) (`Shortlist.batch`), each sentence is scored
    over its own shortlist only (the others' pieces get -inf before the log-softmax), so a
    sentence translates the same alone or in any batch; without it, over the batch's union.
    """

    def __init__(self, model: Seq2Seq | Transformer, ids: Tensor, weight: Tensor,
                 bias: Tensor | None, allowed: Tensor | None = None) -> None:
        super().__init__()
        if ids.numel() < NUM_SPECIALS or not torch.equal(ids[:NUM_SPECIALS].cpu(),
                                                         torch.arange(NUM_SPECIALS)):
            raise ValueError("shortlist ids must be sorted and start with the special ids 0..3")
        self.model = model
        self.ids = ids
        self.weight = weight.index_select(0, ids)  # (N, E)
        self.bias = None if bias is None else bias.index_select(0, ids)  # (N,)
        # (B, N) True = forbidden; None when every sentence may use every id
        self.banned = None if allowed is None or bool(allowed.all()) else ~allowed.to(ids.device)

    def encode(self, src: Tensor, src_lengths: Tensor) -> Any:
        return self.model.encode(src, src_lengths)

    def init_state(self, enc: Any) -> _RowState:
        state = self.model.init_state(enc)
        return _RowState(state, torch.arange(state.mask.size(0), device=state.mask.device))

    def step(self, state: SearchState, prev: Tensor) -> tuple[Tensor, _RowState, Tensor]:
        """Like the model's `step` with `prev` (B,) and log probs (B, N) in shortlist positions.

        A state not from `init_state` is taken as one row per sentence. Goes through the
        model's `decoder.embed` / `decoder.step` (the RNN `Decoder` and the `TransformerDecoder`
        share them) and replaces its output layer.
        """
        if not isinstance(state, _RowState):
            state = _RowState(state, torch.arange(state.mask.size(0), device=state.mask.device))
        decoder = self.model.decoder
        features, new_inner, weights = decoder.step(state.inner, decoder.embed(self.ids[prev]))
        # F.linear (addmm / mm), with a bf16 copy's rows padded to few kernel shapes
        logits = bucketed_linear(features, self.weight, self.bias)
        if self.banned is not None:
            logits.masked_fill_(self.banned.index_select(0, state.sentence), float("-inf"))
        # fp32 log-softmax also for a bf16 model (`Translator` precision bf16)
        return logits.float().log_softmax(dim=-1), _RowState(new_inner, state.sentence), weights

    def to_vocabulary(self, result: SearchResult) -> SearchResult:
        """Map a search result's token positions back to vocabulary ids."""
        ids = self.ids.tolist()
        tokens = [[[ids[p] for p in hyp] for hyp in hyps] for hyps in result.tokens]
        return SearchResult(tokens, result.scores, result.attention, result.hit_max_len)


def output_layer(model: Seq2Seq | Transformer) -> tuple[Tensor, Tensor | None]:
    """The fp32 output projection (weight (V, E), bias (V,) or None) of a float model."""
    layer = model.decoder.output
    if not isinstance(layer.weight, Tensor):
        raise ValueError("output_layer: the model is quantized; take the layer from the fp32 "
                         "model before quantizing")
    return layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
