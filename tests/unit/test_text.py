"""nmt.text: the one text-cleaning function, the Unicode check, and that serving can import it
without pandas."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nmt.text import normalize, unicode_problem


@pytest.mark.parametrize(("raw", "expected"), [
    ("Caf\udce9 time.", "not valid UTF-8 at character 3 (byte 0xe9)"),  # surrogateescape
    ("\udcff bad", "not valid UTF-8 at character 0 (byte 0xff)"),     # JSON "\udcff"
    ("ok \ud83d", "not valid UTF-8 at character 3 (lone surrogate U+D83D)"),
])
def test_unicode_problem_names_the_character(raw: str, expected: str) -> None:
    assert unicode_problem(raw) == expected


@pytest.mark.parametrize("text", ["", "Café time.", "Cours\u202f!", "\U0001f600 a", "\ufeffGo."])
def test_valid_text_has_no_problem(text: str) -> None:
    assert unicode_problem(text) is None


def test_normalize_does_not_hide_lone_surrogates() -> None:
    assert unicode_problem(normalize(" Caf\udce9\u00a0time. ")) is not None


def test_importing_text_does_not_import_pandas_torch_or_mlflow() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, nmt.text; "
                          "print([m for m in ('pandas', 'torch', 'mlflow') if m in sys.modules])"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_corpus_uses_the_same_function() -> None:
    from nmt.data import corpus

    assert corpus.normalize is normalize
