"""Tokenizers: special ids, round trips, save/load, reproducible training."""

from __future__ import annotations

from pathlib import Path

import pytest

from nmt.data import vocab
from nmt.data.vocab import CharTokenizer, SentencePieceTokenizer, load_tokenizers, save_tokenizers
from nmt.specials import BOS_ID, EOS_ID, PAD_ID, UNK_ID

TEXTS = ["Be nice.", "Drop it!", "Get out!", "I love you.", "Tom is here.", "Be quiet!",
         "It's raining.", "We won.", "Call me.", "Help me!"] * 20


def _sp() -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train(TEXTS, 60, "unigram", 1.0, seed=1)


def test_sentencepiece_specials_and_round_trip() -> None:
    tok = _sp()
    ids = tok.encode("Be nice.")
    assert ids and min(ids) > EOS_ID
    assert tok.decode(ids) == "Be nice."
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == "Be nice."
    assert UNK_ID in tok.encode("Zzyzx ☃")


def test_sentencepiece_training_is_reproducible() -> None:
    assert _sp().model_proto == _sp().model_proto


def test_char_tokenizer() -> None:
    tok = CharTokenizer.train(["abc", "cab!"])
    assert tok.vocab_size == 4 + 4
    assert tok.decode(tok.encode("cab")) == "cab"
    assert tok.encode("z") == [UNK_ID]
    assert tok.decode([BOS_ID, *tok.encode("a"), EOS_ID]) == "a"


@pytest.mark.parametrize("kind", ["char", "sentencepiece"])
def test_save_load(tmp_path: Path, kind: str) -> None:
    src = CharTokenizer.train(TEXTS) if kind == "char" else _sp()
    trg = CharTokenizer.train(["Sois gentil."]) if kind == "char" else _sp()
    save_tokenizers(tmp_path, src, trg)
    src2, trg2 = load_tokenizers(tmp_path)
    assert src2.kind == kind
    assert src2.encode("Be nice.") == src.encode("Be nice.")
    assert trg2.vocab_size == trg.vocab_size


def test_load_missing_folder_says_which_stage(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="vectorize"):
        load_tokenizers(tmp_path)


def test_sentencepiece_samples_only_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to `SP_SAMPLE_SENTENCES` the model is that of no bound (same bytes); past it, a
    sample of that many sentences is used."""
    texts = [f"{t} {i % 37}" for i, t in enumerate(TEXTS * 2)]  # 400 sentences
    unbounded = SentencePieceTokenizer.train(texts, 60, "unigram", 1.0, seed=1).model_proto
    monkeypatch.setattr(vocab, "SP_SAMPLE_SENTENCES", len(texts))
    assert SentencePieceTokenizer.train(texts, 60, "unigram", 1.0, seed=1).model_proto == unbounded
    monkeypatch.setattr(vocab, "SP_SAMPLE_SENTENCES", 150)  # SentencePiece needs > 100
    sampled = SentencePieceTokenizer.train(texts, 60, "unigram", 1.0, seed=1)
    assert sampled.model_proto != unbounded
    assert sampled.decode(sampled.encode("Be nice. 3")) == "Be nice. 3"
    assert sampled.encode_batch(["We won.", "Help me!"]) == [sampled.encode("We won."),
                                                             sampled.encode("Help me!")]
