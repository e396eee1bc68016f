"""Parity gate: the portable export must return the eager model's tokens (greedy and beam)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nmt.export.errors import ExportError
from nmt.export.programs import load_runner
from nmt.translator import Translator


@dataclass(frozen=True)
class ParityReport:
    """Token-level agreement of the portable runner with the eager model."""

    sentences: int
    beam_size: int
    greedy_mismatches: int
    beam_mismatches: int
    max_score_diff: float
    examples: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.greedy_mismatches == 0 and self.beam_mismatches == 0


def check_parity(translator: Translator, export_dir: Path, sentences: Sequence[str]
                 ) -> ParityReport:
    """Translate `sentences` eagerly and with the exported runner (greedy and beam), compare ids.

    Both sides run the same search code (the export ships `nmt.model.search`), so a mismatch
    means the exported programs compute something else than the eager model.
    """
    runner = load_runner(export_dir).PortableTranslator(export_dir)
    beam_size = translator.search.beam_size
    mismatches, examples, max_diff = {}, [], 0.0
    for beam in sorted({1, beam_size}):
        eager = translator.translate(sentences, beam_size=beam, nbest=1)
        port = runner.translate(sentences, beam_size=beam, nbest=1)
        bad = [i for i, (e, p) in enumerate(zip(eager, port, strict=True))
               if e.tokens[0] != p.tokens[0]]
        mismatches[beam] = len(bad)
        examples += [{"beam": beam, "source": sentences[i], "eager": eager[i].text,
                      "portable": port[i].hypotheses[0]} for i in bad[:5]]
        diffs = [abs(e.scores[0] - p.scores[0]) for e, p in zip(eager, port, strict=True)
                 if e.tokens[0] == p.tokens[0] and math.isfinite(e.scores[0])]
        max_diff = max([max_diff, *diffs])
    return ParityReport(len(sentences), beam_size, mismatches[1], mismatches[beam_size],
                        round(max_diff, 8), examples)


def parity_sentences(test_parquet: Path, count: int) -> list[str]:
    """The first `count` distinct English sources of the test split."""
    import pandas as pd

    if not Path(test_parquet).is_file():
        raise ExportError(f"{test_parquet} not found: run `dvc repro vectorize` first")
    english = pd.read_parquet(test_parquet, columns=["en"])["en"]
    return list(dict.fromkeys(english.tolist()))[:count]
