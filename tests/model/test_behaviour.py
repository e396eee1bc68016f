"""Behavioural tests of a trained full-size model (opt-in: `pytest -m model --model-dir models`).

They check properties any usable English->French model has, not exact outputs: translation does
not depend on spacing, short everyday sentences translate without hitting the length cap, and
output lengths are in proportion to the input.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nmt.translator import Translator

pytestmark = pytest.mark.model

SHORT = ["Be nice.", "Drop it!", "Get out!", "Thank you.", "I am cold.", "Where is the station?",
         "She is reading a book.", "We lost the game.", "Tom is my brother.", "It's raining."]
SPACING = [
    ("Be nice.", ["  Be nice.  ", "Be  nice.", "Be\u00a0nice.", "Be\tnice.", "Be nice.\u200b"]),
    ("Where is the station?", ["Where is the  station?", " Where\u202fis the station? "]),
]


@pytest.fixture(scope="module")
def translator(request: pytest.FixtureRequest) -> Translator:
    model_dir = Path(request.config.getoption("--model-dir"))
    return Translator.from_model_dir(model_dir)


@pytest.mark.parametrize(("plain", "variants"), SPACING)
def test_whitespace_invariance(translator: Translator, plain: str, variants: list[str]) -> None:
    expected = translator.translate([plain])[0]
    for got in translator.translate(variants):
        assert got.tokens == expected.tokens, repr(got.source)


def test_short_sentences_translate(translator: Translator) -> None:
    for t in translator.translate(SHORT):
        assert t.text.strip(), f"empty translation of {t.source!r}"
        assert not t.hit_max_len, f"{t.source!r} ran to the length cap: {t.text!r}"
        assert t.unk_count == 0, f"{t.source!r} has unknown source pieces"
        assert "\ufffd" not in t.text and "<unk>" not in t.text


def test_sane_lengths(translator: Translator) -> None:
    out = translator.translate(SHORT)
    ratios = [len(t.text) / len(t.source) for t in out]
    for t, r in zip(out, ratios, strict=True):
        assert 0.4 <= r <= 3.0, f"{t.source!r} -> {t.text!r}: length ratio {r:.2f}"
    assert 0.8 <= sum(ratios) / len(ratios) <= 1.8  # French runs ~10-30% longer than English


def test_no_runaway_repetition(translator: Translator) -> None:
    for t in translator.translate(SHORT):
        words = t.text.split()
        assert not any(words[i:i + 3] == words[i + 3:i + 6] for i in range(len(words) - 5)), \
            f"{t.source!r} -> {t.text!r} repeats itself"
