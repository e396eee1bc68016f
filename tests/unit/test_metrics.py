"""Corpus metrics: multi-reference streams, BLEU/chrF/TER, one computation for val and test."""

from __future__ import annotations

import pytest
import sacrebleu

from nmt import evaluation, lit_module
from nmt.metrics import corpus_bleu, corpus_scores, reference_streams

REFS = [  # BLEU needs 4-grams: every sentence has at least 4 tokens
    ["Tu dois être gentil avec lui.", "Tu dois être gentille avec lui.",
     "Vous devez être gentils avec lui."],  # three references
    ["Sors d'ici tout de suite !"],  # one reference
]
A1, A2, A3 = REFS[0]
B1 = REFS[1][0]


def test_reference_streams_pad_with_none() -> None:
    assert reference_streams(REFS) == [[A1, B1], [A2, None], [A3, None]]


def test_hypothesis_equal_to_second_reference_scores_100() -> None:
    scores = corpus_scores([A2, B1], REFS)
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)
    assert scores["ter"] == pytest.approx(0.0)
    assert str(scores["signature/bleu"]).startswith("nrefs:var|")


def test_three_refs_and_one_ref_scored_like_per_sentence_reference_sets() -> None:
    hyps = ["Vous devez être gentil avec elle.", "Sortez d'ici tout de suite !"]
    expected = sacrebleu.BLEU().corpus_score(hyps, [[A1, B1], [A2, None], [A3, None]]).score
    assert 0 < expected < 100
    assert corpus_scores(hyps, REFS)["bleu"] == pytest.approx(expected, abs=1e-3)
    # The second source has one reference only: its missing streams must not be ""
    empty_padded = sacrebleu.TER().corpus_score(hyps, [[A1, B1], [A2, ""], [A3, ""]]).score
    assert corpus_scores(hyps, REFS)["ter"] != pytest.approx(empty_padded)
    # every reference counts: scoring only the first would lose the match with the 3rd one
    first_only = corpus_scores([A3, B1], [[r[0]] for r in REFS])["bleu"]
    assert corpus_scores([A3, B1], REFS)["bleu"] == 100.0 > first_only


def test_flat_reference_list_is_rejected() -> None:
    with pytest.raises(TypeError, match="one list of reference strings per hypothesis"):
        corpus_scores([B1], [B1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        corpus_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_scores(["a"], [[]])


def test_multi_reference_bleu_uses_every_reference() -> None:
    hyps = ["the cat sat on the mat", "a dog runs in the park"]
    refs = [["the cat sat on the mat", "a cat was sitting on the mat"],
            ["a dog runs in the park"]]  # fewer references for the second source
    assert corpus_bleu(hyps, refs) == pytest.approx(100.0)
    assert corpus_bleu(hyps, [["x y z w"], refs[1]]) < 60


def test_val_and_test_bleu_are_one_computation_with_the_numbers_of_before() -> None:
    hyps = ["Vous devez être gentil avec elle.", "Sortez d'ici tout de suite !"]
    # what val/bleu (sacrebleu.corpus_bleu) and test/bleu (BLEU().corpus_score) computed before
    before_val = sacrebleu.corpus_bleu(hyps, [[A1, B1], [A2, None], [A3, None]]).score
    before_test = round(sacrebleu.BLEU().corpus_score(hyps, [[A1, B1], [A2, None],
                                                             [A3, None]]).score, 4)
    assert corpus_bleu(hyps, REFS) == before_val  # exactly, not rounded
    assert corpus_scores(hyps, REFS)["bleu"] == before_test == round(before_val, 4)
    assert lit_module.corpus_bleu is corpus_bleu  # val/bleu
    assert evaluation.corpus_scores is corpus_scores  # test/bleu, test/chrf, test/ter
