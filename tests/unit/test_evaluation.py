"""Evaluation helpers: length buckets, reports, heatmaps (scoring: test_metrics.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nmt.evaluation import (
    Decoded,
    bleu_by_length,
    bucket_labels,
    bucket_of,
    samples_markdown,
    save_heatmap,
)
from nmt.translator import Translation


def test_bucket_assignment() -> None:
    edges = [5, 10, 15, 20, 30]
    assert bucket_labels(edges) == ["01-05", "06-10", "11-15", "16-20", "21-30", "31+"]
    assert [bucket_of(n, edges) for n in (1, 5, 6, 10, 11, 30, 31, 99)] == [0, 0, 1, 1, 2, 4, 5, 5]
    assert bucket_labels([]) == ["1+"]


def test_bleu_by_length_rows() -> None:
    refs = [["a b c d"], ["e f g h"], ["i j k l m n"]]
    rows = bleu_by_length([3, 4, 12], refs, {"bleu": ["a b c d", "e f g h", "x y z w v u"],
                                             "bleu_greedy": ["a b c d", "x", "i j k l m n"]},
                          [5, 10, 15])
    assert [r["bucket"] for r in rows] == ["01-05", "11-15"]  # the empty 06-10 bucket is left out
    assert [r["sentences"] for r in rows] == [2, 1]
    assert (rows[0]["min_src_tokens"], rows[0]["max_src_tokens"]) == (3, 4)
    assert rows[0]["bleu"] == 100.0 and rows[1]["bleu"] == 0.0 and rows[1]["bleu_greedy"] == 100


def _translation(source: str, text: str, hit: bool = False) -> Translation:
    return Translation(source, [text], [-1.0], [[5, 6]], torch.zeros(3, 2), hit_max_len=hit)


def test_decoded_metrics_count_speed_and_cap() -> None:
    out = Decoded([_translation("a", "x", hit=True), _translation("b", "y"),
                   _translation("", "")], seconds=2.0)
    m = out.metrics("_greedy")
    assert m["test/sentences_per_s_greedy"] == 1.0  # empty sources are not counted
    assert m["test/tokens_per_s_greedy"] == 3.0  # 2 x (2 tokens + EOS) / 2 s
    assert m["test/hit_max_len_greedy"] == 1


def test_samples_markdown_lists_examples_and_references() -> None:
    ex = Decoded([_translation("Be nice.", "Sois gentil !")], 1.0)
    test = Decoded([_translation("Get out!", "Sors !", hit=True)], 1.0)
    text = samples_markdown(["Be nice."], (ex, ex), ["Get out!"], [["Sors !", "Dehors !"]], [0],
                            (test, test), beam_size=5, seed=1)
    assert "**Be nice.**" in text and "beam: Sois gentil !" in text
    assert "reference: Dehors !" in text and "(cut at length cap)" in text


def test_heatmap_png(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    save_heatmap(path, np.full((3, 4), 0.25), ["▁Be", "▁nice", ".", "</s>"],
                 ["▁Sois", "▁gentil", "</s>"], "Be nice. -> Sois gentil")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
