"""Corpus parsing and normalisation."""

from __future__ import annotations

import pytest

from nmt.data.corpus import parse_corpus
from nmt.text import normalize


@pytest.mark.parametrize(("raw", "expected"), [
    ("Cours\u202f!", "Cours !"),
    ("Quoi\u00a0?", "Quoi ?"),
    ("deux\u2009mots", "deux mots"),
    ("zero\u200bwidth\u200c\u200d\ufeff", "zerowidth"),
    ("  many   spaces\t\there ", "many spaces here"),
    ("e\u0301te\u0301", "\u00e9t\u00e9"),  # NFD -> NFC
    ("", ""),
])
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


def test_normalize_is_idempotent() -> None:
    text = "  \u00abBonjour\u202f!\u00bb\u200b dit-il.  "
    assert normalize(normalize(text)) == normalize(text)


def test_parse_accepts_two_and_three_columns_and_keeps_attribution() -> None:
    data = b"Go.\tVa !\nHi.\tSalut !\tCC-BY 2.0 (France) Attribution: tatoeba.org #1\n\n"
    result = parse_corpus(data)
    assert result.pairs["en"].tolist() == ["Go.", "Hi."]
    attribution = "CC-BY 2.0 (France) Attribution: tatoeba.org #1"
    assert result.pairs["attribution"].tolist() == ["", attribution]
    assert result.pairs["line"].tolist() == [1, 2]
    assert result.total_lines == 2 and result.rejected.empty


def test_parse_rejects_with_line_number_and_reason() -> None:
    data = (b"ok\tbon\n"
            b"one column\n"
            b"a\tb\tc\td\n"
            b"\tvide\n"
            + "empty\t \u00a0\n".encode()
            + b"bad \xff\tmauvais\n"
            + b"fine\tbien\r\n")
    result = parse_corpus(data)
    assert result.pairs["en"].tolist() == ["ok", "fine"]
    rejected = dict(zip(result.rejected["line"], result.rejected["reason"], strict=True))
    assert rejected[2].startswith("expected 2 or 3") and "got 1" in rejected[2]
    assert "got 4" in rejected[3]
    assert rejected[4] == "empty English side"
    assert rejected[5] == "empty French side"
    assert rejected[6] == "not valid UTF-8 at byte 4"
    assert result.total_lines == 7
    assert result.rejected_share == pytest.approx(5 / 7)
