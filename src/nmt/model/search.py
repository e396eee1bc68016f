"""Batched greedy and beam search over `Seq2Seq.step`.

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

Beam stopping rule: each step takes the top 2K of the K * V continuations. An EOS candidate
ranked within the top K finishes a hypothesis (into a pool of the K best finished ones, by
normalised score); the K best non-EOS candidates stay alive, so the beam never shrinks. A
sentence is done when its pool holds K hypotheses and the worst of them is at least as good as
any alive hypothesis could still become: log probs only decrease and the length penalty only
grows, so the best alive raw score divided by the penalty at the length cap is an upper bound.
It is also done at its length cap. The search stops when every sentence is done; the top beam
ending alone never stops a sentence. With K = 1 and length_penalty = 0 this is exactly greedy
search (same tokens and scores); with a length penalty, K = 1 may keep searching after EOS.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nmt.model.decoder import DecoderState
from nmt.model.seq2seq import Seq2Seq
from nmt.specials import BOS_ID, EOS_ID, PAD_ID

NEG_INF = float("-inf")


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
def greedy_search(model: Seq2Seq, src: Tensor, src_lengths: Tensor, max_len_ratio: float = 1.5,
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
        state, max_len = _start(model, src, src_lengths, max_len_ratio, max_len_offset, 1)
        tokens, scores, attn = _greedy_loop(model, state, max_len)
    gen_len = (tokens != PAD_ID).sum(dim=1)  # (B,) generated tokens incl. EOS
    out = [[row[: n - 1]] for row, n in zip(tokens.tolist(), gen_len.tolist(), strict=True)]
    attention = _trim_attention(attn, gen_len, src_lengths)
    return SearchResult(out, scores[:, None], attention, (gen_len - 1) == max_len)


def _greedy_loop(model: Seq2Seq, state: DecoderState,
                 max_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Argmax decoding; returns tokens (B, T) incl. EOS then PAD, scores (B,), attn (B, T, S)."""
    batch, src_len = state.mask.shape
    steps = int(max_len.max()) + 1
    tokens = state.mask.new_full((batch, steps), PAD_ID, dtype=torch.long)
    attn = state.enc_out.new_zeros(batch, steps, src_len)
    scores = state.enc_out.new_zeros(batch)
    ended = torch.zeros_like(state.mask[:, 0])
    prev = torch.full_like(tokens[:, 0], BOS_ID)
    for t in range(steps):
        log_probs, state, weights = model.step(state, prev)
        best, tok = _constrain(log_probs, max_len == t).max(dim=-1)  # (B,)
        tok = tok.masked_fill(ended, PAD_ID)
        scores += best.masked_fill(ended, 0.0)
        tokens[:, t] = tok
        attn[:, t] = weights
        ended |= tok == EOS_ID
        if bool(ended.all()):
            break
        prev = tok
    return tokens, scores, attn


@dataclass
class _Beams:
    """Search state for B sentences x K hypotheses (T = max steps, S = source length)."""

    scores: Tensor  # (B, K) cumulative log prob of alive hypotheses
    tokens: Tensor  # (B, K, T) alive token ids so far, PAD after
    attn: Tensor  # (B, K, T, S) alive attention rows so far
    fin_scores: Tensor  # (B, K) normalised scores of finished hypotheses, sorted; -inf = empty
    fin_tokens: Tensor  # (B, K, T)
    fin_attn: Tensor  # (B, K, T, S)
    fin_len: Tensor  # (B, K) generated tokens incl. EOS
    done: Tensor  # (B,) bool

    @classmethod
    def empty(cls, batch: int, beam: int, steps: int, like: Tensor) -> _Beams:
        """All hypotheses empty; `like` (N, S, ...) gives S, dtype and device."""
        src_len = like.size(1)
        scores = like.new_full((batch, beam), NEG_INF)
        scores[:, 0] = 0.0  # only the first copy of each sentence starts alive
        tokens = torch.full((batch, beam, steps), PAD_ID, dtype=torch.long, device=like.device)
        attn = like.new_zeros(batch, beam, steps, src_len)
        return cls(scores=scores, tokens=tokens, attn=attn,
                   fin_scores=torch.full_like(scores, NEG_INF), fin_tokens=tokens.clone(),
                   fin_attn=attn.clone(), fin_len=torch.ones_like(tokens[:, :, 0]),
                   done=torch.zeros(batch, dtype=torch.bool, device=like.device))


@torch.inference_mode()
def beam_search(model: Seq2Seq, src: Tensor, src_lengths: Tensor, beam_size: int = 5,
                length_penalty: float = 0.6, max_len_ratio: float = 1.5, max_len_offset: int = 10,
                nbest: int = 1) -> SearchResult:
    """Batched beam search with GNMT length penalty (stopping rule in the module docstring).

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
        state, max_len = _start(model, src, src_lengths, max_len_ratio, max_len_offset,
                                beam_size)
        steps = int(max_len.max()) + 1
        beams = _Beams.empty(src.size(0), beam_size, steps, state.enc_out)
        prev = torch.full_like(beams.tokens[:, :, 0].reshape(-1), BOS_ID)  # (B * K,)
        for t in range(steps):
            log_probs, state, weights = model.step(state, prev)
            rows, prev = _beam_step(beams, log_probs, weights, t, max_len, length_penalty)
            if bool(beams.done.all()):
                break
            state = state.reorder(rows)
    return _beam_finish(beams, src_lengths, max_len, nbest)


def _beam_step(beams: _Beams, log_probs: Tensor, weights: Tensor, t: int, max_len: Tensor,
               alpha: float) -> tuple[Tensor, Tensor]:
    """Expand, finish EOS candidates, keep the K best alive; returns (rows, tokens), (B * K,)."""
    batch, beam = beams.scores.shape
    vocab = log_probs.size(-1)
    at_cap = (max_len == t).repeat_interleave(beam)  # (B * K,)
    log_probs = _constrain(log_probs, at_cap).view(batch, beam, vocab)
    cand = (beams.scores[:, :, None] + log_probs).view(batch, beam * vocab)
    top_scores, top_idx = cand.topk(2 * beam, dim=1)  # (B, 2K), sorted descending
    origin = top_idx // vocab + torch.arange(batch, device=cand.device)[:, None] * beam
    tok = top_idx % vocab
    is_eos = tok == EOS_ID
    _finish_hypotheses(beams, top_scores[:, :beam], origin[:, :beam], is_eos[:, :beam],
                       weights, t, alpha)
    alive_scores, pick = top_scores.masked_fill(is_eos, NEG_INF).topk(beam, dim=1)  # (B, K)
    rows = origin.gather(1, pick).view(-1)  # (B * K,) source row of each new hypothesis
    tok = tok.gather(1, pick)  # (B, K)
    beams.scores = alive_scores
    beams.tokens = _select_rows(beams.tokens, rows)
    beams.tokens[:, :, t] = tok
    beams.attn = _select_rows(beams.attn, rows)
    beams.attn[:, :, t] = weights.index_select(0, rows).view(batch, beam, -1)
    best_possible = alive_scores.max(dim=1).values / gnmt_length_penalty(max_len + 1, alpha)
    beams.done |= (beams.fin_scores[:, -1] >= best_possible) | (max_len == t)
    return rows, tok.view(-1)


def _finish_hypotheses(beams: _Beams, scores: Tensor, rows: Tensor, is_eos: Tensor,
                       weights: Tensor, t: int, alpha: float) -> None:
    """Merge EOS candidates (B, K) from rows `rows` into the finished pool, best K kept."""
    new = is_eos & torch.isfinite(scores) & ~beams.done[:, None]  # (B, K)
    if not bool(new.any()):
        return
    batch, beam = scores.shape
    flat = rows.reshape(-1)
    normed = (scores / gnmt_length_penalty(t + 1, alpha)).masked_fill(~new, NEG_INF)
    attn = _select_rows(beams.attn, flat)
    attn[:, :, t] = weights.index_select(0, flat).view(batch, beam, -1)
    pool_scores, keep = torch.cat([beams.fin_scores, normed], dim=1).topk(beam, dim=1)
    beams.fin_scores = pool_scores
    beams.fin_tokens = _take(torch.cat([beams.fin_tokens, _select_rows(beams.tokens, flat)], 1),
                             keep)
    beams.fin_attn = _take(torch.cat([beams.fin_attn, attn], dim=1), keep)
    lengths = torch.full_like(beams.fin_len, t + 1)
    beams.fin_len = torch.cat([beams.fin_len, lengths], dim=1).gather(1, keep)


def _beam_finish(beams: _Beams, src_lengths: Tensor, max_len: Tensor,
                 nbest: int) -> SearchResult:
    """Pool -> SearchResult; the pool is already sorted by normalised score."""
    lengths = beams.fin_len[:, :nbest]
    out = [[ids[: n - 1] for ids, n in zip(hyps, lens, strict=True)]
           for hyps, lens in zip(beams.fin_tokens[:, :nbest].tolist(), lengths.tolist(),
                                 strict=True)]
    attention = _trim_attention(beams.fin_attn[:, 0], lengths[:, 0], src_lengths)
    return SearchResult(out, beams.fin_scores[:, :nbest], attention,
                        (lengths[:, 0] - 1) == max_len)


def _start(model: Seq2Seq, src: Tensor, src_lengths: Tensor, ratio: float, offset: int,
           beam: int) -> tuple[DecoderState, Tensor]:
    """Encode, build the initial state with `beam` copies per sentence, compute length caps."""
    state = model.init_state(model.encode(src, src_lengths))
    if beam > 1:
        rows = torch.arange(src.size(0), device=src.device).repeat_interleave(beam)
        state = state.index_select(rows)  # (B * K) rows, sentence-major
    return state, max_output_lengths(src_lengths, ratio, offset).to(src.device)


def _constrain(log_probs: Tensor, at_cap: Tensor) -> Tensor:
    """Forbid PAD and BOS everywhere, and everything but EOS on rows at their length cap."""
    vocab = torch.arange(log_probs.size(-1), device=log_probs.device)
    banned = (vocab == PAD_ID) | (vocab == BOS_ID)
    banned = banned[None, :] | (at_cap[:, None] & (vocab != EOS_ID)[None, :])  # (N, V)
    return log_probs.masked_fill(banned, NEG_INF)


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
    checks = [
        (beam_size >= 1, "beam_size", f"must be >= 1, got {beam_size}"),
        (1 <= nbest <= beam_size, "nbest", f"must be in [1, beam_size={beam_size}], got {nbest}"),
        (length_penalty >= 0, "length_penalty", f"must be >= 0, got {length_penalty}"),
        (max_len_ratio > 0, "max_len_ratio", f"must be > 0, got {max_len_ratio}"),
        (max_len_offset >= 0, "max_len_offset", f"must be >= 0, got {max_len_offset}"),
    ]
    for ok, name, message in checks:
        if not ok:
            raise ValueError(f"{name}: {message}")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout), restoring the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
