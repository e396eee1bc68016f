"""Lexical shortlist: building the lists, the file, and search through `ShortlistModel`."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from factories import tiny_model_cfg
from nmt.config import SearchConfig
from nmt.data.vocab import CharTokenizer
from nmt.model import beam_search, build_model, greedy_search
from nmt.model.quantize import quantize_int8
from nmt.shortlist import Shortlist, ShortlistError, ShortlistModel, build_shortlist, output_layer
from nmt.specials import BOS_ID
from nmt.translator import Translator

pytestmark = pytest.mark.usefixtures("one_thread")

# three pairs over source ids 5..7 and target ids 10..12 (specials 0..3 never appear in data)
SRC = [[5, 6], [5, 7, 5], [6]]
TRG = [[10, 11], [10, 12], [11, 11]]
CFG = tiny_model_cfg(rnn="gru", hidden=6)
V = 40


def test_lists_rank_by_pairs_shared_then_id_and_add_specials_and_frequent() -> None:
    sl = build_shortlist(SRC, TRG, src_vocab_size=8, trg_vocab_size=16, top_k=1, frequent=1)
    lists = {s: sl.targets[sl.offsets[s]:sl.offsets[s + 1]].tolist() for s in range(8)}
    # 5 shares 2 pairs with 10, 1 with 11 and 12 (repeats in a sentence count once)
    # 6 shares 2 with 11 (counted once per pair) and 1 with 10; 7: 10 and 12 tie -> lower id
    assert lists == {0: [], 1: [], 2: [], 3: [], 4: [], 5: [10], 6: [11], 7: [10]}
    # token counts: 11 x3, 10 x2, 12 x1 -> the most frequent is 11
    assert sl.always.tolist() == [0, 1, 2, 3, 11]
    assert sl.candidates(torch.tensor([[5, 3, 0]])).tolist() == [0, 1, 2, 3, 10, 11]
    assert sl.candidates(torch.tensor([[6, 3], [6, 0]])).tolist() == [0, 1, 2, 3, 11]
    wider = build_shortlist(SRC, TRG, 8, 16, top_k=2, frequent=0)
    assert wider.targets[wider.offsets[5]:wider.offsets[6]].tolist() == [10, 11]
    assert wider.always.tolist() == [0, 1, 2, 3]


def test_top_k_zero_is_a_disabled_shortlist() -> None:
    sl = build_shortlist(SRC, TRG, 8, 16, top_k=0, frequent=100)
    assert not sl.enabled
    assert build_shortlist(SRC, TRG, 8, 16, top_k=1, frequent=0).enabled


def test_save_load_round_trip_and_bad_files(tmp_path: Path) -> None:
    sl = build_shortlist(SRC, TRG, 8, 16, top_k=2, frequent=1)
    path = tmp_path / "shortlist.npz"
    sl.save(path)
    back = Shortlist.load(path)
    for name in ("offsets", "targets", "always"):
        np.testing.assert_array_equal(getattr(back, name), getattr(sl, name))
    assert (back.top_k, back.frequent, back.src_vocab_size, back.trg_vocab_size) == (2, 1, 8, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["shortlist.npz"]  # no temp file left
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ShortlistError, match=r"bad\.npz: not a shortlist file.*dvc repro"):
        Shortlist.load(bad)
    with pytest.raises(ShortlistError, match=r"8/16 .* model has 9/16.*dvc repro shortlist"):
        sl.check_fits(9, 16, "here")


def _random_shortlist(seed: int) -> tuple[Shortlist, torch.Tensor]:
    """A shortlist of every other target id (plus specials) for sources 4..V-1."""
    gen = np.random.default_rng(seed)
    src = [gen.integers(4, V, 5).tolist() for _ in range(30)]
    trg = [gen.integers(4, V, 6).tolist() for _ in range(30)]
    sl = build_shortlist(src, trg, V, V, top_k=6, frequent=3)
    batch = torch.tensor(src[:3])
    return sl, sl.candidates(batch)


@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_full_shortlist_searches_exactly_like_the_model(rnn: str) -> None:
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, rnn=rnn), V, V).eval()
    wrapped = ShortlistModel(model, torch.arange(V), *output_layer(model))
    src = torch.randint(4, V, (3, 5))
    lengths = torch.tensor([5, 3, 4])
    for search in (greedy_search, beam_search):
        plain = search(model, src, lengths)
        cut = wrapped.to_vocabulary(search(wrapped, src, lengths))  # type: ignore[arg-type]
        assert cut.tokens == plain.tokens
        torch.testing.assert_close(cut.scores, plain.scores)


def test_partial_shortlist_renormalises_over_its_ids_and_decodes_only_them() -> None:
    torch.manual_seed(1)
    model = build_model(CFG, V, V).eval()
    sl, ids = _random_shortlist(0)
    assert ids[:4].tolist() == [0, 1, 2, 3] and len(ids) < V
    wrapped = ShortlistModel(model, ids, *output_layer(model))
    src, lengths = torch.randint(4, V, (2, 4)), torch.tensor([4, 2])
    with torch.inference_mode():
        state = model.init_state(model.encode(src, lengths))
        full, _, _ = model.step(state, torch.full((2,), BOS_ID))
        cut, _, _ = wrapped.step(state, torch.full((2,), BOS_ID))  # BOS: position 2 = id 2
        logits = model.decoder.output(model.decoder.step(state, model.decoder.embed(
            torch.full((2,), BOS_ID)))[0])
    torch.testing.assert_close(cut, logits[:, ids].log_softmax(-1))
    assert not torch.allclose(cut, full[:, ids])  # renormalised over fewer pieces
    result = wrapped.to_vocabulary(beam_search(wrapped, src, lengths, nbest=2))  # type: ignore
    allowed = set(ids.tolist())
    assert all(set(h) <= allowed for hyps in result.tokens for h in hyps)


def test_ids_must_start_with_the_specials_and_int8_models_are_refused() -> None:
    model = build_model(CFG, V, V).eval()
    with pytest.raises(ValueError, match="special ids"):
        ShortlistModel(model, torch.tensor([0, 1, 3, 5]), *output_layer(model))
    with pytest.raises(ValueError, match="quantized"):
        output_layer(quantize_int8(model))


def _char_translator(shortlist: Shortlist | None) -> Translator:
    chars = sorted(set("abcdefghij .!"))
    src, trg = CharTokenizer(chars), CharTokenizer(chars)
    torch.manual_seed(0)
    model = build_model(CFG, src.vocab_size, trg.vocab_size)
    search = SearchConfig(beam_size=3, length_penalty=0.6, max_len_ratio=1.0, max_len_offset=3,
                          nbest=2, batch_size=2)
    return Translator(model, src, trg, search, max_src_tokens=12, shortlist=shortlist)


def test_translator_decodes_within_the_shortlist_fp32_and_int8() -> None:
    plain = _char_translator(None)
    size = plain.trg_tok.vocab_size
    src_ids = [plain.src_tok.encode(s) for s in ("abc", "ij!")]
    trg_ids = [plain.trg_tok.encode(s) for s in ("cab", "jj.")]
    sl = build_shortlist(src_ids, trg_ids, plain.src_tok.vocab_size, size, top_k=2, frequent=0)
    translator = _char_translator(sl)
    allowed = set(sl.candidates(torch.tensor([plain.src_tok.encode("abc ij!")])).tolist())
    assert len(allowed) < size
    for t in (translator, _char_translator(sl).to_int8()):
        out = t.translate(["abc", "ij!", "a b c"], nbest=2)
        assert all(set(tokens) <= allowed for o in out for tokens in o.tokens)
        assert all(o.scores == sorted(o.scores, reverse=True) for o in out)
    full = translator.without_shortlist()
    assert full.shortlist is None and translator.shortlist is sl
    assert [o.tokens for o in full.translate(["abc", "ij!"])] == \
        [o.tokens for o in plain.translate(["abc", "ij!"])]


def test_translator_refuses_a_shortlist_for_other_vocabularies() -> None:
    sl = build_shortlist(SRC, TRG, 8, 16, top_k=1, frequent=0)
    with pytest.raises(ShortlistError, match="Translator: shortlist built for vocabularies 8/16"):
        _char_translator(sl)
    assert _char_translator(build_shortlist(SRC, TRG, 8, 16, 0, 0)).shortlist is None


def test_each_sentence_keeps_its_own_shortlist_inside_a_batch() -> None:
    """Alone or batched with sentences that widen the union: the same tokens and scores."""
    torch.manual_seed(3)
    model = build_model(CFG, V, V).eval()
    sl, _ = _random_shortlist(1)
    src = torch.tensor([[5, 9, 3, 0], [20, 31, 7, 3], [38, 3, 0, 0]])
    lengths = torch.tensor([3, 4, 2])

    def decode(rows: list[int], search) -> tuple[list, Tensor]:  # noqa: ANN001
        sub = src[rows][:, : int(lengths[rows].max())]
        ids, allowed = sl.batch(sub)
        wrapped = ShortlistModel(model, ids, *output_layer(model), allowed)
        result = wrapped.to_vocabulary(search(wrapped, sub, lengths[rows]))
        return result.tokens, result.scores

    for search in (greedy_search, partial(beam_search, beam_size=3, nbest=2)):
        together_tokens, together_scores = decode([0, 1, 2], search)
        for i in range(3):
            alone_tokens, alone_scores = decode([i], search)
            assert alone_tokens[0] == together_tokens[i]
            torch.testing.assert_close(alone_scores[0], together_scores[i])
            own = set(sl.candidates(src[i : i + 1]).tolist())
            assert all(set(h) <= own for h in alone_tokens[0])
    ids, allowed = sl.batch(src)
    assert allowed.shape == (3, len(ids)) and not bool(allowed.all())  # the union is wider


def test_batch_matches_each_sentences_own_list() -> None:
    """`batch` (vectorised) against its definition, one sentence at a time: the union of the
    lists of the pieces present (PAD, EOS and out-of-range ids add only `always`), and each
    row's own membership."""
    sl, _ = _random_shortlist(2)
    gen = torch.Generator().manual_seed(5)
    for rows, width in ((1, 1), (1, 6), (4, 3), (17, 9)):
        src = torch.randint(0, V + 3, (rows, width), generator=gen)  # some ids >= V: ignored
        src[0, -1] = 0
        ids, allowed = sl.batch(src)
        own = [set(sl.always.tolist()).union(*(
            sl.targets[sl.offsets[s]:sl.offsets[s + 1]].tolist()
            for s in row.tolist() if 0 <= s < V)) for row in src]
        assert ids.tolist() == sorted(set().union(*own))
        assert allowed.shape == (rows, len(ids)) and allowed.dtype == torch.bool
        for b in range(rows):
            mine = zip(ids.tolist(), allowed[b].tolist(), strict=True)
            assert {i for i, ok in mine if ok} == own[b]
