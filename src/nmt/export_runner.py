"""Standalone English->French translator over the portable export: needs torch (and sentencepiece
for sentencepiece tokenizers), never the `nmt` package.

The export stage copies this file to `models/export/translate.py` next to:

    encoder.pt2        torch.export program: (src (B, S), src_lengths (B,)) -> decoder state
    decoder_step.pt2   torch.export program: (prev (N,), *state) -> (log_probs (N, V), hidden,
                       cell, attn_vec, attention (N, S))
    runner.json        decoding settings (beam, length penalty, length caps, max_src_tokens)
    tokenizers/        meta.json + src/trg tokenizer files
    ATTRIBUTION.md     corpus licence (CC-BY 2.0): keep it with anything you ship

Usage:
    python translate.py "Be nice." "Get out!"
    printf 'Drop it!\\n' | python translate.py --beam 5 --nbest 3

The searches mirror `nmt.model.search` step for step (same candidate selection, stopping rule,
length caps and GNMT length penalty), so they return the eager model's tokens; the export stage
checks that on test sentences before anything is registered, so a change to `nmt.model.search`
must be mirrored here (including which rows each step runs: dropping finished sentences changes
the batch size, and with it the last bits of the matrix products). The decoder state is a tuple of
tensors: (hidden (L, N, H), cell (L, N, H), attn_vec (N, E), enc_out (N, S, H_enc),
mask (N, S), keys (N, S, K)); for a GRU `cell` is zeros and passed through unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # fixed special ids (nmt.specials)
NEG_INF = float("-inf")
RUNNER_CONFIG = "runner.json"
ENCODER_FILE = "encoder.pt2"
STEP_FILE = "decoder_step.pt2"

# Copy of nmt.data.corpus.normalize (a unit test checks the two agree).
_SPACE_LIKE = dict.fromkeys(map(ord, "\u00a0\u202f\u2009\u2007\u2002\u2003"), " ")
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFC, no-break/thin spaces to spaces, invisible characters removed, spaces collapsed."""
    text = unicodedata.normalize("NFC", text)
    text = text.translate(_SPACE_LIKE).translate(_INVISIBLE)
    return _WHITESPACE.sub(" ", text).strip()


# ------------------------------------------------------------------------------ tokenizers
class _SentencePiece:
    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._sp.decode([int(i) for i in ids if i > EOS_ID or i == UNK_ID]))


class _Chars:
    def __init__(self, path: Path) -> None:
        self.chars = json.loads(path.read_text(encoding="utf-8"))
        self._index = {c: i + 4 for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        return [self._index.get(c, UNK_ID) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 4] if i >= 4 else "\ufffd" if i == UNK_ID else ""
                       for i in ids if 0 <= i < len(self.chars) + 4)


def load_tokenizers(folder: Path) -> tuple[_SentencePiece | _Chars, _SentencePiece | _Chars]:
    """(source, target) tokenizers from a `tokenizers/` folder."""
    kind = json.loads((folder / "meta.json").read_text(encoding="utf-8"))["kind"]
    if kind == "sentencepiece":
        return _SentencePiece(folder / "src.model"), _SentencePiece(folder / "trg.model")
    return _Chars(folder / "src.chars.json"), _Chars(folder / "trg.chars.json")


# ---------------------------------------------------------------------------------- search
@dataclass(frozen=True)
class Hypotheses:
    """tokens: B x nbest x ids (no BOS/EOS), best first; scores: B x nbest."""

    tokens: list[list[list[int]]]
    scores: list[list[float]]


@dataclass(frozen=True)
class Result:
    """One sentence's `nbest` translations, best first (as `nmt.translator.Translation`)."""

    hypotheses: list[str]
    scores: list[float]
    tokens: list[list[int]]

    @property
    def text(self) -> str:
        return self.hypotheses[0]


def _constrain(log_probs: Tensor, at_cap: Tensor) -> Tensor:
    """Forbid PAD and BOS everywhere, and everything but EOS on rows at their length cap."""
    vocab = torch.arange(log_probs.size(-1))
    banned = (vocab == PAD_ID) | (vocab == BOS_ID)
    banned = banned[None, :] | (at_cap[:, None] & (vocab != EOS_ID)[None, :])
    return log_probs.masked_fill(banned, NEG_INF)


def _select(x: Tensor, rows: Tensor) -> Tensor:
    """x (B, K, ...) viewed as (B * K, ...) rows `rows` (N,) -> (B, N // B, ...)."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, rows).view(x.size(0), -1, *x.shape[2:])


def _expand(state: tuple[Tensor, ...], rows: Tensor) -> tuple[Tensor, ...]:
    """Rows of every state field (hidden and cell have rows on dim 1)."""
    return tuple(s.index_select(1 if i < 2 else 0, rows) for i, s in enumerate(state))


def _reorder(state: tuple[Tensor, ...], rows: Tensor) -> tuple[Tensor, ...]:
    """Reselect the per-hypothesis fields (hidden, cell, attn_vec); encoder fields stay."""
    hidden, cell, attn_vec, *rest = state
    return (hidden.index_select(1, rows), cell.index_select(1, rows),
            attn_vec.index_select(0, rows), *rest)


class PortableTranslator:
    """Translate with the exported programs; mirrors `nmt.translator.Translator`."""

    def __init__(self, export_dir: Path | str) -> None:
        folder = Path(export_dir)
        self.config = json.loads((folder / RUNNER_CONFIG).read_text(encoding="utf-8"))
        self.encoder = torch.export.load(folder / ENCODER_FILE).module().requires_grad_(False)
        self.step = torch.export.load(folder / STEP_FILE).module().requires_grad_(False)
        self.src_tok, self.trg_tok = load_tokenizers(folder / "tokenizers")

    def _max_len(self, src_lengths: Tensor) -> Tensor:
        cfg = self.config
        return torch.ceil(src_lengths.double() * cfg["max_len_ratio"]
                          + cfg["max_len_offset"]).long()

    @torch.no_grad()
    def greedy(self, src: Tensor, src_lengths: Tensor) -> Hypotheses:
        """Greedy search over padded sources (B, S) with lengths (B,); a sentence leaves the
        batch at its EOS."""
        state = tuple(self.encoder(src, src_lengths))
        max_len = self._max_len(src_lengths)
        steps = int(max_len.max()) + 1
        tokens = torch.full((src.size(0), steps), PAD_ID, dtype=torch.long)
        scores = state[2].new_zeros(src.size(0))
        active = torch.arange(src.size(0))
        prev = torch.full((src.size(0),), BOS_ID, dtype=torch.long)
        for t in range(steps):
            log_probs, *new_state, _ = self.step(prev, *state)
            state = (*new_state, *state[3:])
            best, tok = _constrain(log_probs, max_len[active] == t).max(dim=-1)
            scores[active] += best
            tokens[active, t] = tok
            ended = tok == EOS_ID
            if bool(ended.all()):
                break
            if bool(ended.any()):
                keep = (~ended).nonzero().squeeze(1)
                state, active, tok = _expand(state, keep), active[keep], tok[keep]
            prev = tok
        gen_len = (tokens != PAD_ID).sum(dim=1)
        out = [[row[: n - 1]] for row, n in zip(tokens.tolist(), gen_len.tolist(), strict=True)]
        return Hypotheses(out, [[s] for s in scores.tolist()])

    @torch.no_grad()
    def beam(self, src: Tensor, src_lengths: Tensor, beam_size: int, nbest: int = 1
             ) -> Hypotheses:
        """Beam search (GNMT length penalty, bounded stopping rule) over padded sources: first
        step on one row per sentence, done sentences leave the batch."""
        batch, k, alpha = src.size(0), beam_size, float(self.config["length_penalty"])
        state = tuple(self.encoder(src, src_lengths))
        max_len = self._max_len(src_lengths)
        steps = int(max_len.max()) + 1
        out_scores = state[2].new_full((batch, k), NEG_INF)
        out_tokens = torch.full((batch, k, steps), PAD_ID, dtype=torch.long)
        out_len = torch.ones_like(out_tokens[:, :, 0])
        scores = state[2].new_zeros(batch, 1)  # alive hypotheses: 1 per sentence, then k
        tokens = out_tokens[:, :1].clone()
        fin_scores, fin_tokens, fin_len = out_scores.clone(), out_tokens.clone(), out_len.clone()
        done = torch.zeros(batch, dtype=torch.bool)
        active = torch.arange(batch)
        prev = torch.full((batch,), BOS_ID, dtype=torch.long)
        for t in range(steps):
            log_probs, *new_state, _ = self.step(prev, *state)
            n, width, vocab = active.size(0), scores.size(1), log_probs.size(-1)
            cap = max_len[active]
            log_probs = _constrain(log_probs, (cap == t).repeat_interleave(width))
            cand = log_probs.view(n, width, vocab).add_(scores[:, :, None]).view(n, -1)
            top_scores, top_idx = cand.topk(2 * k, dim=1)
            origin = top_idx // vocab + torch.arange(n)[:, None] * width
            tok = top_idx % vocab
            is_eos = tok == EOS_ID
            # finish: EOS candidates ranked within the top k join the finished pool
            new = is_eos[:, :k] & torch.isfinite(top_scores[:, :k]) & ~done[:, None]
            if bool(new.any()):
                normed = (top_scores[:, :k] / ((5.0 + t + 1) / 6.0) ** alpha
                          ).masked_fill(~new, NEG_INF)
                fin_scores, keep = torch.cat([fin_scores, normed], dim=1).topk(k, dim=1)
                pool = torch.cat([fin_tokens, _select(tokens, origin[:, :k].reshape(-1))], 1)
                fin_tokens = pool[torch.arange(n)[:, None], keep]
                fin_len = torch.cat([fin_len, torch.full_like(fin_len, t + 1)], 1).gather(1, keep)
            # the k best non-EOS candidates stay alive
            scores, pick = top_scores.masked_fill(is_eos, NEG_INF).topk(k, dim=1)
            rows = origin.gather(1, pick).view(-1)
            tokens = _select(tokens, rows)
            tokens[:, :, t] = tok.gather(1, pick)
            # done: the pool's nbest-th beats any alive hypothesis's best possible final score
            bound_penalty = ((5.0 + (cap + 1)) / 6.0) ** alpha  # penalty at the cap
            best_possible = scores.max(dim=1).values / bound_penalty
            done |= (fin_scores[:, nbest - 1] >= best_possible) | (cap == t)
            prev = tokens[:, :, t].reshape(-1)
            state = (*new_state, *state[3:])
            if bool(done.any()):
                finished = active[done]
                out_scores[finished], out_tokens[finished] = fin_scores[done], fin_tokens[done]
                out_len[finished] = fin_len[done]
                if bool(done.all()):
                    break
                keep = (~done).nonzero().squeeze(1)
                rows, prev = rows.view(n, k)[keep].reshape(-1), prev.view(n, k)[keep].reshape(-1)
                scores, tokens, done = scores[keep], tokens[keep], done[keep]
                fin_scores, fin_tokens, fin_len = fin_scores[keep], fin_tokens[keep], fin_len[keep]
                active = active[keep]
                state = _expand(state, rows)
            elif t == 0:
                state = _expand(state, rows)
            else:
                state = _reorder(state, rows)
        lengths = out_len[:, :nbest].tolist()
        out = [[ids[: n - 1] for ids, n in zip(hyps, lens, strict=True)]
               for hyps, lens in zip(out_tokens[:, :nbest].tolist(), lengths, strict=True)]
        return Hypotheses(out, out_scores[:, :nbest].tolist())

    def search(self, src: Tensor, src_lengths: Tensor, beam_size: int, nbest: int = 1
               ) -> Hypotheses:
        """Greedy search for beam_size 1, else beam search (as `Translator` does)."""
        if beam_size == 1:
            return self.greedy(src, src_lengths)
        return self.beam(src, src_lengths, beam_size, nbest)

    def translate(self, sentences: Sequence[str], beam_size: int | None = None,
                  nbest: int | None = None, batch_size: int | None = None) -> list[Result]:
        """Per sentence, `nbest` translations with scores, best first; "" for empty input."""
        cfg = self.config
        beam = cfg["beam_size"] if beam_size is None else beam_size
        n = min(cfg["nbest"], beam) if nbest is None else nbest
        batch = cfg["batch_size"] if batch_size is None else batch_size
        if beam < 1 or not 1 <= n <= beam or batch < 1:
            raise ValueError(f"need beam_size >= 1, 1 <= nbest <= beam_size, batch_size >= 1; "
                             f"got {beam}, {n}, {batch}")
        sources = [normalize(s) for s in sentences]
        out = [Result([""] * n, [0.0] * n, [[] for _ in range(n)]) for _ in sources]
        encoded = sorted(((self.src_tok.encode(s)[: cfg["max_src_tokens"]], i)
                          for i, s in enumerate(sources) if s), key=lambda e: (len(e[0]), e[1]))
        for start in range(0, len(encoded), batch):
            chunk = encoded[start:start + batch]
            src, src_lengths = pad_sources([ids for ids, _ in chunk])
            hyps = self.search(src, src_lengths, beam, n)
            for row, (_, index) in enumerate(chunk):
                tokens = hyps.tokens[row]
                out[index] = Result([self.trg_tok.decode(t) for t in tokens],
                                    [float(s) for s in hyps.scores[row]], tokens)
        return out


def pad_sources(seqs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Source ids -> (src (B, S) with EOS appended then PAD, src_lengths (B,)), as in training."""
    lengths = torch.tensor([len(s) + 1 for s in seqs], dtype=torch.long)
    src = torch.full((len(seqs), int(lengths.max())), PAD_ID, dtype=torch.long)
    for row, seq in enumerate(seqs):
        src[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        src[row, len(seq)] = EOS_ID
    return src, lengths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sentences", nargs="*", help="English sentences; none or '-': stdin")
    parser.add_argument("--export-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--beam", type=int, default=None, help="beam size (1 = greedy)")
    parser.add_argument("--nbest", type=int, default=None, help="hypotheses per sentence")
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args(argv)
    lines = args.sentences
    if not lines or lines == ["-"]:
        lines = [line.rstrip("\r\n") for line in sys.stdin]
    translator = PortableTranslator(args.export_dir)
    try:
        results = translator.translate(lines, args.beam, args.nbest, args.batch_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for i, result in enumerate(results):
        if len(result.hypotheses) == 1:
            print(result.text)
            continue
        for text, score in zip(result.hypotheses, result.scores, strict=True):
            print(f"{i}\t{score:.4f}\t{text}" if math.isfinite(score) else f"{i}\t-inf\t")
    return 0


if __name__ == "__main__":
    sys.exit(main())
