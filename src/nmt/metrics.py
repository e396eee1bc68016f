"""Corpus translation metrics (sacrebleu BLEU, chrF, TER): the one place scores are computed.

Used for `val/bleu` during training (`nmt.lit_module`) and the `test/*` scores of the evaluate
stage (`nmt.evaluation`), so both count the same way. Scores are corpus-level on detokenised text
against *every* reference of each source. sacrebleu takes references as parallel streams of equal
length, one string per hypothesis; sources with fewer references are padded with `None`, which
sacrebleu drops per segment (its signature then reads `nrefs:var`). Padding with "" instead would
count an empty reference, and a flat list of strings instead of streams scores near 0 without an
error.
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu

SCORERS = {"bleu": sacrebleu.BLEU, "chrf": sacrebleu.CHRF, "ter": sacrebleu.TER}


def reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-source reference lists -> sacrebleu streams, padded with None to equal length.

    >>> reference_streams([["a", "b"], ["c"]])
    [['a', 'c'], ['b', None]]
    """
    if isinstance(references, str) or any(isinstance(r, str) for r in references):
        raise TypeError("references: expected one list of reference strings per hypothesis "
                        "(a flat list of strings would score as a single reference stream)")
    if any(len(r) == 0 for r in references):
        raise ValueError("references: every hypothesis needs at least one reference")
    width = max((len(r) for r in references), default=0)
    return [[r[k] if k < len(r) else None for r in references] for k in range(width)]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100, not rounded) of one detokenised hypothesis per source.

    Args:
        hypotheses: one string per source.
        references: all references of each source (lists may differ in length).
    """
    _check_lengths(hypotheses, references)
    streams = reference_streams(references)
    return float(sacrebleu.BLEU().corpus_score(list(hypotheses), streams).score)


def corpus_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                  metrics: Sequence[str] = ("bleu", "chrf", "ter")) -> dict[str, float | str]:
    """Corpus scores (0-100, rounded to 4 decimals) and signatures.

    Example: {"bleu": 31.2, "signature/bleu": "nrefs:var|..."}.

    Args:
        hypotheses: one detokenised string per source.
        references: all references of each source (lists may differ in length).
        metrics: any of "bleu", "chrf", "ter".
    """
    _check_lengths(hypotheses, references)
    streams = reference_streams(references)
    out: dict[str, float | str] = {}
    for name in metrics:
        scorer = SCORERS[name]()
        if hypotheses:
            out[name] = round(float(scorer.corpus_score(list(hypotheses), streams).score), 4)
        else:
            out[name] = float("nan")
        out[f"signature/{name}"] = str(scorer.get_signature())
    return out


def _check_lengths(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} reference "
                         "lists; need one list per hypothesis")
