"""Text the model reads: `normalize` (for the corpus and every input) and `unicode_problem`."""

from __future__ import annotations

import re
import unicodedata

# Spaces that French typography puts before ; : ! ? and inside « », plus thin spaces.
_SPACE_LIKE = dict.fromkeys(map(ord, "\u00a0\u202f\u2009\u2007\u2002\u2003"), " ")
# Zero-width and invisible format characters (ZWSP, ZWNJ, ZWJ, word joiner, BOM, soft hyphen).
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_WHITESPACE = re.compile(r"\s+")
_SURROGATE = re.compile("[\ud800-\udfff]")


def normalize(text: str) -> str:
    """NFC, no-break/thin spaces to plain spaces, zero-width characters removed, spaces collapsed.

    The validate stage applies it to the corpus and the translator to user input, so training and
    serving cannot drift. It expects valid Unicode: check user input with `unicode_problem` first.

    >>> normalize("Cours\u202f!\u200b  ")
    'Cours !'
    """
    text = unicodedata.normalize("NFC", text)
    text = text.translate(_SPACE_LIKE).translate(_INVISIBLE)
    return _WHITESPACE.sub(" ", text).strip()


def unicode_problem(text: str) -> str | None:
    """Why `text` cannot be translated as Unicode text, or None when it can.

    Lone surrogates (U+D800..U+DFFF) are what Python makes of bytes that are not UTF-8 (command-
    line arguments, `surrogateescape`) and what a JSON `"\\udcff"` escape decodes to; no tokenizer
    can encode them.

    >>> unicode_problem("Caf\\udce9 time.")
    'not valid UTF-8 at character 3 (byte 0xe9)'
    >>> unicode_problem("Café time.") is None
    True
    """
    match = _SURROGATE.search(text)
    if match is None:
        return None
    code = ord(match.group())
    what = (f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF
            else f"lone surrogate U+{code:04X}")
    return f"not valid UTF-8 at character {match.start()} ({what})"
