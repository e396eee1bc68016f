"""Batched greedy and beam search over a step model (`Seq2Seq.step`, or the exported programs).

The whole batch (x beam) lives in tensors: one `step` call per output position advances every
hypothesis of every sentence; there is no per-sentence Python loop until the final conversion
to lists.

Rules shared by both searches:
- Output length: at most `ceil(max_len_ratio * src_len + max_len_offset)` tokens per sentence
  (EOS not counted). At that length only EOS is allowed next, so a capped hypothesis still
  pays the model's log probability of EOS.
- PAD and BOS are never generated.
- A score is the sum of token log probabilities, EOS included. Beam search divides the final
  score by the GNMT length penalty ((5 + n) / 6) ** alpha with n = generated tokens incl. EOS.
- `hit_max_len` marks sentences whose best output has the maximum allowed length.

Beam stopping rule: each step takes the top 2K of the K * V continuations (any K works: when
there are fewer than 2K, e.g. K * V at the first step where K = 1, or a short shortlist, the
missing places score -inf and are never finished or kept ahead of a real one). An EOS candidate
ranked within the top K finishes a hypothesis (into a pool of the K best finished ones, by
normalised score); the K best non-EOS candidates stay alive, so the beam never shrinks. A
sentence is done when its pool holds the `nbest` hypotheses to return and the last of them is
at least as good as any alive hypothesis could still become: log probs only decrease and the
length penalty only grows, so the best alive raw score divided by the penalty at the length cap
is an upper bound. Nothing found later could then enter the returned n-best, so stopping there
returns exactly what searching on to the cap would (waiting for all K pool slots, as an earlier
version did, decoded 15% more rows for the same outputs). It is also done at its length cap.
The search stops when every sentence is done; the top beam ending alone never stops a
sentence. With K = 1 and length_penalty = 0 this is exactly greedy search (same tokens and
scores); with a length penalty, K = 1 may keep searching after EOS.

Work: a sentence leaves the batch as soon as it is done (greedy: at its EOS), so each step runs
only the sentences still decoding; beam search runs its first step on one row per sentence.
This halves the rows the decoder runs on the test split and changes no result beyond the last
bits of the matrix products (which depend on the batch size).

Dependencies: torch, `nmt.specials` and `nmt.beam_rule` only, imported relatively, because the
export stage ships this file unchanged beside its programs
(`nmt.export.programs.write_search_code`) and the portable runner drives it with the exported
encoder and decoder-step programs: eager decoding and the export run the same search. A model
is anything with the `StepModel` protocol (encode, init_state, step) whose state has the
`SearchState` protocol (row selection); a new architecture needs only those, not a search of
its own.

Size: one module past the ~300-line guideline on purpose: the portable export ships it as one
file (see above), so splitting it would ship several and couple the runner to their layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, Self

import torch
from torch import Tensor, nn

# relative: this file is shipped with the portable export, outside the `nmt` package
from ..beam_rule import beam_problem
from ..specials import BOS_ID, EOS_ID, PAD_ID

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------- step protocol
class SearchState(Protocol):
    """Decoder state of N rows (`nmt.model.decoder.DecoderState` is one).

    mask: (E, S) bool, True on real source tokens (gives S and the device).
    enc_out: (E, S, H_enc) encoder outputs (gives the float dtype of scores and attention).
    E = N in a state fresh from `init_state`; later a state may keep one encoder row per
    sentence for all of its hypotheses (`TransformerState`), so the search reads only S, the
    dtype and the device from these once the rows have been selected.
    """

    @property
    def mask(self) -> Tensor: ...

    @property
    def enc_out(self) -> Tensor: ...

    def index_select(self, idx: Tensor) -> Self:
        """Rows `idx` (M,) of every field (beam expansion, dropping finished sentences)."""
        ...

    def reorder(self, idx: Tensor) -> Self:
        """Rows `idx` (M,) where row idx[i] has the same source as row i (beam reordering)."""
        ...


class StepModel(Protocol):
    """What the search calls (`Seq2Seq`, `nmt.shortlist.ShortlistModel`, the export's runner)."""

    def encode(self, src: Tensor, src_lengths: Tensor) -> Any:
        """Encoder output for src (B, S) long with src_lengths (B,) long."""
        ...

    def init_state(self, encoder_output: Any) -> SearchState:
        """Initial decoder state, one row per sentence."""
        ...

    def step(self, state: Any, prev_tokens: Tensor) -> tuple[Tensor, Any, Tensor]:
        """prev_tokens (N,) -> log_probs (N, V), the new state, attention weights (N, S)."""
        ...


@dataclass(frozen=True)
class SearchResult:
    """Search output for B sentences.

    tokens: B x nbest x token ids, without BOS/EOS, best first.
    scores: (B, nbest) scores, sorted descending per sentence (length-normalised for beam).
    attention: per sentence, the best hypothesis's weights (T_gen, S_b): one row per generated
        token including the final EOS (T_gen = len(tokens[b][0]) + 1), real source columns only.
    hit_max_len: (B,) bool, True where the best output has the maximum allowed length.
    """

    tokens: list[list[list[int]]]
    scores: Tensor
    attention: list[Tensor]
    hit_max_len: Tensor


def max_output_lengths(src_lengths: Tensor, ratio: float, offset: int) -> Tensor:
    """Per-sentence cap on output tokens: ceil(ratio * src_len + offset), shape (B,)."""
    return torch.ceil(src_lengths.double() * ratio + offset).long()


def gnmt_length_penalty(lengths: Tensor | int, alpha: float) -> Tensor | float:
    """((5 + n) / 6) ** alpha (Wu et al., 2016); 1 when alpha = 0."""
    return ((5.0 + lengths) / 6.0) ** alpha


@torch.inference_mode()
def greedy_search(model: StepModel, src: Tensor, src_lengths: Tensor, max_len_ratio: float = 1.5,
                  max_len_offset: int = 10) -> SearchResult:
    """Batched greedy decoding.

    Args:
        model: the seq2seq model (temporarily put in eval mode).
        src: source ids (B, S), long; src_lengths: (B,), long.
        max_len_ratio, max_len_offset: output cap ceil(ratio * src_len + offset).
    Returns:
        SearchResult with nbest = 1 and unnormalised scores (sum of log probabilities).
    """
    _check_args(beam_size=1, nbest=1, length_penalty=0.0, max_len_ratio=max_len_ratio,
                max_len_offset=max_len_offset)
    with _eval_mode(model):
        state, max_len = _start(model, src, src_lengths, max_len_ratio, max_len_offset)
        tokens, scores, attn = _greedy_loop(model, state, max_len)
    gen_len = (tokens != PAD_ID).sum(dim=1)  # (B,) generated tokens incl. EOS
    out = [[row[: n - 1]] for row, n in zip(tokens.tolist(), gen_len.tolist(), strict=True)]
    attention = _trim_attention(attn, gen_len, src_lengths)
    return SearchResult(out, scores[:, None], attention, (gen_len - 1) == max_len)


def _greedy_loop(model: StepModel, state: SearchState,
                 max_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Argmax decoding; returns tokens (B, T) incl. EOS then PAD, scores (B,), attn (B, T, S).

    A sentence leaves the batch (its state rows are dropped) as soon as it emits EOS, so later
    steps only run the sentences still decoding.
    """
    batch, src_len = state.mask.shape
    steps = int(max_len.max()) + 1
    tokens = state.mask.new_full((batch, steps), PAD_ID, dtype=torch.long)
    attn = state.enc_out.new_zeros(batch, steps, src_len)
    scores = state.enc_out.new_zeros(batch)
    active = torch.arange(batch, device=state.mask.device)  # sentence of each state row
    prev = torch.full_like(active, BOS_ID)
    for t in range(steps):
        log_probs, state, weights = model.step(state, prev)
        best, tok = _constrain_(log_probs, max_len[active] == t).max(dim=-1)  # (A,)
        scores[active] += best
        tokens[active, t] = tok
        attn[active, t] = weights
        ended = tok == EOS_ID
        if bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            state, active, tok = state.index_select(keep), active[keep], tok[keep]
        prev = tok
    return tokens, scores, attn


@dataclass
class _Pool:
    """Finished hypotheses of N sentences, K slots each, sorted by normalised score."""

    scores: Tensor  # (N, K) normalised scores; -inf = empty slot
    tokens: Tensor  # (N, K, T) token ids incl. EOS, PAD after
    attn: Tensor  # (N, K, T, S)
    lengths: Tensor  # (N, K) generated tokens incl. EOS

    @classmethod
    def empty(cls, batch: int, beam: int, steps: int, like: Tensor) -> _Pool:
        """Empty slots; `like` (N, S, ...) gives S, dtype and device."""
        scores = like.new_full((batch, beam), NEG_INF)
        tokens = torch.full((batch, beam, steps), PAD_ID, dtype=torch.long, device=like.device)
        return cls(scores=scores, tokens=tokens, attn=like.new_zeros(batch, beam, steps,
                                                                     like.size(1)),
                   lengths=torch.ones_like(tokens[:, :, 0]))

    def select(self, idx: Tensor) -> _Pool:
        """Sentences `idx` (M,) -> a pool of M sentences."""
        return _Pool(self.scores[idx], self.tokens[idx], self.attn[idx], self.lengths[idx])

    def put(self, idx: Tensor, other: _Pool) -> None:
        """Write `other`'s sentences into sentences `idx` of this pool."""
        self.scores[idx], self.tokens[idx] = other.scores, other.tokens
        self.attn[idx], self.lengths[idx] = other.attn, other.lengths


@dataclass
class _Beams:
    """Search state for the A sentences still decoding, k alive hypotheses each.

    k is 1 before the first step (every sentence starts from BOS alone) and K after it.
    """

    scores: Tensor  # (A, k) cumulative log prob of alive hypotheses
    tokens: Tensor  # (A, k, T) alive token ids so far, PAD after
    attn: Tensor  # (A, k, T, S) alive attention rows so far
    pool: _Pool  # (A, K, ...) finished hypotheses
    done: Tensor  # (A,) bool
    max_len: Tensor  # (A,) output cap
    cap_penalty: Tensor  # (A,) the length penalty at the cap (the stopping rule's bound)

    @classmethod
    def start(cls, beam: int, steps: int, like: Tensor, max_len: Tensor,
              alpha: float) -> _Beams:
        """One empty alive hypothesis per sentence of `max_len` (B,); `like` (N, S, ...) gives
        S, dtype, device."""
        batch = max_len.size(0)
        pool = _Pool.empty(batch, beam, steps, like)
        return cls(scores=pool.scores.new_zeros(batch, 1), tokens=pool.tokens[:, :1].clone(),
                   attn=pool.attn[:, :1].clone(), pool=pool,
                   done=torch.zeros(batch, dtype=torch.bool, device=like.device),
                   max_len=max_len, cap_penalty=gnmt_length_penalty(max_len + 1, alpha))

    def select(self, idx: Tensor) -> _Beams:
        """Sentences `idx` (M,) only."""
        return _Beams(self.scores[idx], self.tokens[idx], self.attn[idx], self.pool.select(idx),
                      self.done[idx], self.max_len[idx], self.cap_penalty[idx])


@torch.inference_mode()
def beam_search(model: StepModel, src: Tensor, src_lengths: Tensor, beam_size: int = 5,
                length_penalty: float = 0.6, max_len_ratio: float = 1.5, max_len_offset: int = 10,
                nbest: int = 1) -> SearchResult:
    """Batched beam search with GNMT length penalty (stopping rule in the module docstring).

    The first step runs one row per sentence (all K hypotheses would start identical); a
    sentence leaves the batch as soon as it is done, so later steps only run the rest.

    Args:
        model: the seq2seq model (temporarily put in eval mode).
        src: source ids (B, S), long; src_lengths: (B,), long.
        beam_size: K hypotheses kept per sentence; length_penalty: GNMT alpha (0 = off).
        max_len_ratio, max_len_offset: output cap ceil(ratio * src_len + offset).
        nbest: hypotheses returned per sentence, 1 <= nbest <= beam_size.
    Returns:
        SearchResult with `nbest` hypotheses per sentence, best first.
    """
    _check_args(beam_size=beam_size, nbest=nbest, length_penalty=length_penalty,
                max_len_ratio=max_len_ratio, max_len_offset=max_len_offset)
    with _eval_mode(model):
        state, max_len = _start(model, src, src_lengths, max_len_ratio, max_len_offset)
        steps = int(max_len.max()) + 1
        out = _Pool.empty(src.size(0), beam_size, steps, state.enc_out)
        beams = _Beams.start(beam_size, steps, state.enc_out, max_len, length_penalty)
        active = torch.arange(src.size(0), device=src.device)  # sentence of each beams row
        prev = torch.full_like(active, BOS_ID)  # (A * k,)
        for t in range(steps):
            log_probs, state, weights = model.step(state, prev)
            rows, prev = _beam_step(beams, log_probs, weights, t, length_penalty, nbest)
            done = beams.done
            if bool(done.any()):
                out.put(active[done], beams.pool.select(done))
                if bool(done.all()):
                    break
                keep = (~done).nonzero().squeeze(1)
                rows, prev = rows.view(done.size(0), -1)[keep], prev.view(done.size(0), -1)[keep]
                rows, prev = rows.reshape(-1), prev.reshape(-1)
                beams, active = beams.select(keep), active[keep]
                state = state.index_select(rows)  # drops the done sentences' encoder rows too
            elif t == 0:
                state = state.index_select(rows)  # one row per sentence -> K rows
            else:
                state = state.reorder(rows)
    return _beam_finish(out, src_lengths, max_len, nbest)


def _beam_step(beams: _Beams, log_probs: Tensor, weights: Tensor, t: int, alpha: float,
               nbest: int) -> tuple[Tensor, Tensor]:
    """Expand, finish EOS candidates, keep the K best alive; returns (rows, tokens), (A * K,).

    log_probs (A * k, V) and weights (A * k, S) are the step's outputs for the k alive
    hypotheses of each of the A sentences (log_probs is overwritten); `rows` index those A * k
    rows.
    """
    batch, prev_beam = beams.scores.shape
    beam = beams.pool.scores.size(1)
    vocab = log_probs.size(-1)
    at_cap = beams.max_len == t  # (A,)
    log_probs = _constrain_(log_probs.view(batch, prev_beam, vocab), at_cap)
    cand = log_probs.add_(beams.scores[:, :, None]).view(batch, prev_beam * vocab)
    top_scores, top_idx = _top_candidates(cand, 2 * beam)  # (A, 2K), sorted descending
    first_row = torch.arange(0, batch * prev_beam, prev_beam, device=cand.device)  # (A,)
    origin = top_idx // vocab + first_row[:, None]
    tok = top_idx % vocab
    is_eos = tok == EOS_ID
    _finish_hypotheses(beams, top_scores[:, :beam], origin[:, :beam], is_eos[:, :beam],
                       weights, t, alpha)
    alive_scores, pick = top_scores.masked_fill(is_eos, NEG_INF).topk(beam, dim=1)  # (A, K)
    rows = origin.gather(1, pick).view(-1)  # (A * K,) source row of each new hypothesis
    tok = tok.gather(1, pick)  # (A, K)
    beams.scores = alive_scores
    beams.tokens = _select_rows(beams.tokens, rows)
    beams.tokens[:, :, t] = tok
    beams.attn = _select_rows(beams.attn, rows)
    beams.attn[:, :, t] = weights.index_select(0, rows).view(batch, beam, -1)
    best_possible = alive_scores[:, 0] / beams.cap_penalty  # topk: sorted, best first
    beams.done |= (beams.pool.scores[:, nbest - 1] >= best_possible) | at_cap
    return rows, tok.view(-1)


def _top_candidates(cand: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`cand.topk(k, dim=1)` (A, k), also when cand (A, C) has fewer than k columns.

    A beam wider than the candidate set (k alive hypotheses x V tokens, V the vocabulary or a
    short shortlist; at the first step k = 1) leaves places empty: they get score -inf and
    index 0 (the sentence's first row, token PAD). Such a candidate is never finished (only
    finite scores are) and its -inf score keeps every continuation of it last.
    """
    if cand.size(1) >= k:
        return cand.topk(k, dim=1)
    scores, idx = cand.topk(cand.size(1), dim=1)
    missing = k - cand.size(1)
    return (torch.cat([scores, scores.new_full((scores.size(0), missing), NEG_INF)], dim=1),
            torch.cat([idx, idx.new_zeros(idx.size(0), missing)], dim=1))


def _finish_hypotheses(beams: _Beams, scores: Tensor, rows: Tensor, is_eos: Tensor,
                       weights: Tensor, t: int, alpha: float) -> None:
    """Merge EOS candidates (A, K) from rows `rows` into the finished pool, best K kept."""
    new = is_eos & (scores > NEG_INF) & ~beams.done[:, None]  # (A, K); finite: never +inf
    if not bool(new.any()):
        return
    batch, beam = scores.shape
    pool = beams.pool
    flat = rows.reshape(-1)
    normed = (scores / gnmt_length_penalty(t + 1, alpha)).masked_fill(~new, NEG_INF)
    attn = _select_rows(beams.attn, flat)
    attn[:, :, t] = weights.index_select(0, flat).view(batch, beam, -1)
    pool.scores, keep = torch.cat([pool.scores, normed], dim=1).topk(beam, dim=1)
    pool.tokens = _take(torch.cat([pool.tokens, _select_rows(beams.tokens, flat)], 1), keep)
    pool.attn = _take(torch.cat([pool.attn, attn], dim=1), keep)
    lengths = torch.full_like(pool.lengths, t + 1)
    pool.lengths = torch.cat([pool.lengths, lengths], dim=1).gather(1, keep)


def _beam_finish(pool: _Pool, src_lengths: Tensor, max_len: Tensor,
                 nbest: int) -> SearchResult:
    """Pool -> SearchResult; the pool is already sorted by normalised score."""
    lengths = pool.lengths[:, :nbest]
    out = [[ids[: n - 1] for ids, n in zip(hyps, lens, strict=True)]
           for hyps, lens in zip(pool.tokens[:, :nbest].tolist(), lengths.tolist(),
                                 strict=True)]
    attention = _trim_attention(pool.attn[:, 0], lengths[:, 0], src_lengths)
    return SearchResult(out, pool.scores[:, :nbest], attention,
                        (lengths[:, 0] - 1) == max_len)


def _start(model: StepModel, src: Tensor, src_lengths: Tensor, ratio: float,
           offset: int) -> tuple[SearchState, Tensor]:
    """Encode, build the initial state (one row per sentence), compute length caps."""
    state = model.init_state(model.encode(src, src_lengths))
    return state, max_output_lengths(src_lengths, ratio, offset).to(src.device)


def _constrain_(log_probs: Tensor, at_cap: Tensor) -> Tensor:
    """In place: forbid PAD and BOS everywhere, and everything but EOS for sentences at their
    cap. log_probs (A, V) (greedy) or (A, k, V) (beam: k hypotheses per sentence), at_cap (A,).
    """
    log_probs[..., PAD_ID] = NEG_INF
    log_probs[..., BOS_ID] = NEG_INF
    if bool(at_cap.any()):
        rows = at_cap.nonzero().squeeze(1)
        eos = log_probs[rows, ..., EOS_ID]
        log_probs[rows] = NEG_INF
        log_probs[rows, ..., EOS_ID] = eos
    return log_probs


def _select_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x (B, K, ...) viewed as (B * K, ...) rows `rows` (N,) -> (B, N // B, ...)."""
    flat = x.reshape(-1, *x.shape[2:]).index_select(0, rows)
    return flat.view(x.size(0), -1, *x.shape[2:])


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, ...) at per-sentence positions idx (B, K) -> (B, K, ...)."""
    return x[torch.arange(x.size(0), device=x.device)[:, None], idx]


def _trim_attention(attn: Tensor, gen_len: Tensor, src_lengths: Tensor) -> list[Tensor]:
    """(B, T, S) -> per sentence (gen_len_b, src_len_b)."""
    return [a[:n, :s] for a, n, s in zip(attn, gen_len.tolist(), src_lengths.tolist(),
                                          strict=True)]


def _check_args(*, beam_size: int, nbest: int, length_penalty: float, max_len_ratio: float,
                max_len_offset: int) -> None:
    if problem := beam_problem(beam_size, nbest, max_beam=None):  # the search takes any width
        raise ValueError(f"{problem[0]}: {problem[1]}")
    checks = [
        (length_penalty >= 0, "length_penalty", f"must be >= 0, got {length_penalty}"),
        (max_len_ratio > 0, "max_len_ratio", f"must be > 0, got {max_len_ratio}"),
        (max_len_offset >= 0, "max_len_offset", f"must be >= 0, got {max_len_offset}"),
    ]
    for ok, name, message in checks:
        if not ok:
            raise ValueError(f"{name}: {message}")


@contextmanager
def _eval_mode(model: StepModel) -> Iterator[None]:
    """Run an `nn.Module` in eval mode (no dropout), restoring its mode afterwards."""
    if not isinstance(model, nn.Module):  # e.g. exported programs: no training mode to switch
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
