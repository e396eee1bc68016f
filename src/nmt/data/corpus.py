"""Parse `fra.txt` into a pairs table, its fields cleaned with `nmt.text.normalize`."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from nmt.text import normalize

PAIR_COLUMNS = ["en", "fr", "attribution", "line"]


@dataclass(frozen=True)
class ParseResult:
    """Parsed pairs plus the lines that were rejected, with reasons."""

    pairs: pd.DataFrame      # columns en, fr, attribution, line (1-based line number)
    rejected: pd.DataFrame   # columns line, reason, content (repr of the raw bytes, truncated)
    total_lines: int

    @property
    def rejected_share(self) -> float:
        """Share of non-blank lines that were rejected."""
        return len(self.rejected) / self.total_lines if self.total_lines else 0.0


def _split_line(raw: bytes) -> tuple[list[str] | None, str]:
    """Return the normalised fields of one line, or None and the reason it is rejected."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 at byte {exc.start}"
    fields = text.split("\t")
    if len(fields) not in (2, 3):
        return None, f"expected 2 or 3 tab-separated columns, got {len(fields)}"
    fields = [normalize(f) for f in fields]
    if not fields[0]:
        return None, "empty English side"
    if not fields[1]:
        return None, "empty French side"
    return fields, ""


def parse_corpus(data: bytes) -> ParseResult:
    """Parse the raw bytes of `fra.txt` (English TAB French [TAB attribution]).

    Blank lines (e.g. the final newline) are skipped and not counted. Lines of any other shape,
    with an empty side, or not valid UTF-8 are rejected with their 1-based line number and reason.
    """
    rows: list[tuple[str, str, str, int]] = []
    rejected: list[tuple[int, str, str]] = []
    total = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            continue
        total += 1
        fields, reason = _split_line(raw)
        if fields is None:
            rejected.append((number, reason, repr(raw[:200])[2:-1]))
            continue
        attribution = fields[2] if len(fields) == 3 else ""
        rows.append((fields[0], fields[1], attribution, number))
    pairs = pd.DataFrame(rows, columns=PAIR_COLUMNS).astype({"line": "int64"})
    rejects = pd.DataFrame(rejected, columns=["line", "reason", "content"])
    return ParseResult(pairs=pairs, rejected=rejects.astype({"line": "int64"}), total_lines=total)
