"""Translator: normalisation, bad input (empty, over-long, unknown), batching order, files."""

from __future__ import annotations

import logging
import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factories import tiny_model_cfg
from nmt.config import SearchConfig
from nmt.data.vocab import CharTokenizer
from nmt.model import build_model
from nmt.model.quantize import is_quantized, quantize_int8
from nmt.translator import InputError, Translator, read_lines

CFG = tiny_model_cfg()
SEARCH = SearchConfig(beam_size=3, length_penalty=0.6, max_len_ratio=1.0, max_len_offset=3,
                      nbest=1, batch_size=2)
SRC_CHARS = "abcdefghijklmnopqrstuvwxyz .!?'"
TRG_CHARS = "abcdefghijklmnopqrstuvwxyzéè .!?'"
MAX_SRC = 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def translator() -> Translator:
    torch.manual_seed(0)
    src, trg = CharTokenizer(sorted(set(SRC_CHARS))), CharTokenizer(sorted(set(TRG_CHARS)))
    model = build_model(CFG, src.vocab_size, trg.vocab_size)
    return Translator(model, src, trg, SEARCH, max_src_tokens=MAX_SRC)


def test_translation_fields_and_attention_shape(translator: Translator) -> None:
    (t,) = translator.translate(["be nice."])
    assert t.source == "be nice." and len(t.hypotheses) == len(t.scores) == len(t.tokens) == 1
    assert t.text == translator.trg_tok.decode(t.tokens[0])
    assert t.attention.shape == (len(t.tokens[0]) + 1, len("be nice.") + 1)  # + EOS both ways
    assert torch.allclose(t.attention.sum(dim=1), torch.ones(t.attention.size(0)), atol=1e-5)
    assert len(translator.source_pieces("be nice.")) == t.attention.size(1)
    assert len(translator.target_pieces(t.tokens[0])) == t.attention.size(0)
    assert not t.truncated and t.unk_count == 0


def test_input_is_normalised_like_the_corpus(translator: Translator) -> None:
    plain, spaced = translator.translate(["go on!", "  go\u00a0\u200bon\u202f!  "])
    assert spaced.source == "go on !"  # normalize maps U+202F to a space, as for training
    plain2, odd = translator.translate(["go on!", " go \t on!\u200b "])
    assert odd.source == "go on!" and odd.tokens == plain2.tokens == plain.tokens


def test_empty_lines_skip_the_model(translator: Translator,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise AssertionError("the model must not run for empty input")

    monkeypatch.setattr(translator.model, "encode", boom)
    out = translator.translate(["", "   ", "\u200b\u00a0"], beam_size=2, nbest=2)
    assert [t.hypotheses for t in out] == [["", ""]] * 3
    assert all(t.scores == [0.0, 0.0] and t.attention.shape == (0, 0) for t in out)


def test_empty_line_between_sentences_keeps_positions(translator: Translator) -> None:
    out = translator.translate(["hello", "", "bye"])
    assert [t.source for t in out] == ["hello", "", "bye"]
    assert out[1].text == "" and out[0].tokens == translator.translate(["hello"])[0].tokens


def test_over_long_source_is_truncated_counted_and_warned(
        translator: Translator, caplog: pytest.LogCaptureFixture) -> None:
    long = "abcdefghijklmnopqrstuvwxyz"
    with caplog.at_level(logging.WARNING, logger="nmt.translator"):
        short, cut = translator.translate(["hi", long])
    assert cut.truncated and not short.truncated
    assert cut.attention.size(1) == MAX_SRC + 1
    assert cut.tokens == translator.translate([long[:MAX_SRC]])[0].tokens
    assert cut.source == long  # the caller's text, not the cut one
    assert "1 of 2 sentences are longer than 12 source tokens" in caplog.text
    assert "(sentence 2)" in caplog.text


def test_unknown_characters_map_to_unk_and_are_counted(translator: Translator) -> None:
    (t,) = translator.translate(["caf\u00e9 \u6771\u4eac!"])  # é and 東京 unknown to SRC_CHARS
    assert t.unk_count == 3
    assert len(t.hypotheses) == 1


def test_order_restored_across_length_sorted_batches(translator: Translator) -> None:
    sentences = ["a long one.", "hi", "mid size", "x", "longer one!", "ok"]
    batched = translator.translate(sentences, batch_size=2)
    assert [t.source for t in batched] == sentences
    single = [translator.translate([s], batch_size=1)[0] for s in sentences]
    assert [t.tokens for t in batched] == [t.tokens for t in single]
    assert [t.scores[0] for t in batched] == pytest.approx([t.scores[0] for t in single],
                                                           abs=1e-4)


def test_nbest_and_greedy(translator: Translator) -> None:
    (t,) = translator.translate(["thank you"], beam_size=3, nbest=3)
    assert len(t.hypotheses) == 3 and t.scores == sorted(t.scores, reverse=True)
    (g,) = translator.translate(["thank you"], beam_size=1)
    assert len(g.hypotheses) == 1
    with pytest.raises(ValueError, match="nbest"):
        translator.translate(["x"], beam_size=2, nbest=3)


def test_hit_max_len_flag(translator: Translator) -> None:
    out = translator.translate(["abc", "abcdef"], beam_size=1)
    for t, n in zip(out, (3, 6), strict=True):
        cap = n + SEARCH.max_len_offset  # ratio 1.0: ceil(1.0 * (n + EOS) + 3) = n + 4
        assert len(t.tokens[0]) <= cap + 1
        assert t.hit_max_len == (len(t.tokens[0]) == cap + 1)


def test_read_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(b"\xef\xbb\xbfBe nice.\r\n\nGet out!\n")
    assert read_lines(path) == ["Be nice.", "", "Get out!"]
    path.write_bytes(b"no newline")
    assert read_lines(path) == ["no newline"]


def test_read_lines_non_utf8_names_file_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"ok line\nCaf\xe9\n")
    with pytest.raises(InputError, match=r"latin1\.txt: not valid UTF-8 at byte offset 11 "
                                         r"\(line 2"):
        read_lines(path)
    with pytest.raises(InputError, match="cannot read"):
        read_lines(tmp_path / "missing.txt")


def test_from_model_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a model folder.*model.pt"):
        Translator.from_model_dir(tmp_path / "nope")


def test_int8_copy_is_close_to_fp32_and_leaves_the_model_alone(translator: Translator) -> None:
    fp32 = translator.model
    src, lens = torch.tensor([[5, 6, 7, 2]]), torch.tensor([4])
    with torch.inference_mode():
        state = fp32.init_state(fp32.encode(src, lens))
        expected, _, _ = fp32.step(state, torch.tensor([1]))
    assert not translator.int8
    assert translator.to_int8() is translator and translator.int8
    assert translator.model is not fp32 and not is_quantized(fp32)
    quantized = {type(m).__name__ for m in translator.model.modules() if is_quantized(m)}
    assert {"Linear", "LSTM"} <= quantized
    with torch.inference_mode():
        q = translator.model
        got, _, _ = q.step(q.init_state(q.encode(src, lens)), torch.tensor([1]))
    assert got.shape == expected.shape
    assert 0 < (got - expected).abs().max() < 0.1  # quantized, yet close to the fp32 model
    (t,) = translator.translate(["thank you"], beam_size=3, nbest=2)
    assert len(t.hypotheses) == 2 and t.scores == sorted(t.scores, reverse=True)


def test_int8_refuses_a_model_off_the_cpu() -> None:
    model = build_model(CFG, 8, 8).to("meta")
    with pytest.raises(ValueError, match="CPU only, but the model is on meta"):
        quantize_int8(model)


FAULTS_SCRIPT = """
import resource, sys, torch
from nmt.allocator import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory("decode") and keep_freed_memory("decode")  # idempotent
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):  # shrinking score-sized tensors, as batches of a beam search shrink
    a = torch.ones(5_000_000 - i * 100_000); b = a * 2; c = b + a; del a, b, c
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_freed_memory_means_fewer_page_faults() -> None:
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], check=True,
                                       capture_output=True, text=True).stdout)
              for mode in ("default", "tuned")}
    assert faults["tuned"] * 1.5 < faults["default"], faults


def test_text_that_is_not_unicode_is_named_before_decoding(translator: Translator,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise AssertionError("the model must not run when an input is rejected")

    monkeypatch.setattr(translator.model, "encode", boom)
    with pytest.raises(InputError, match=r"1 of 3 inputs .* sentence 2: not valid UTF-8 at "
                                         r"character 3 \(byte 0xe9\)"):
        translator.translate(["go.", "caf\udce9 time.", "hi"])
    with pytest.raises(InputError, match="sentence 1"):
        translator.source_pieces("\udcff bad")


def test_beam_wider_than_the_target_vocabulary(translator: Translator) -> None:
    # 37 target ids; a beam of 40 asks the first step for 80 candidates (it used to raise
    # "selected index k out of range"). The translator puts no upper bound on the beam.
    assert translator.trg_tok.vocab_size < 40
    wide = translator.translate(["be nice.", "go"], beam_size=40, nbest=3)
    assert all(len(t.hypotheses) == 3 and all(map(math.isfinite, t.scores)) for t in wide)
    assert all(t.scores == sorted(t.scores, reverse=True) for t in wide)
    with pytest.raises(ValueError, match=r"^beam_size: must be >= 1, got 0$"):
        translator.translate(["x"], beam_size=0)


def test_default_batch_scales_with_the_beam_and_an_explicit_one_is_kept(
        translator: Translator, monkeypatch: pytest.MonkeyPatch) -> None:
    """SEARCH decodes 2 sentences x beam 3 per batch: greedy takes 6, beam 6 takes 1."""
    sizes: list[int] = []
    search = translator._search

    def spy(ids: list[list[int]], beam: int, nbest: int):  # noqa: ANN202
        sizes.append(len(ids))
        return search(ids, beam, nbest)

    monkeypatch.setattr(translator, "_search", spy)
    sentences = ["a long one.", "hi", "mid size", "x", "longer one!", "ok", "bye"]
    greedy = translator.translate(sentences, beam_size=1)
    assert sizes == [6, 1]
    sizes.clear()
    translator.translate(sentences)
    assert sizes == [2, 2, 2, 1]
    sizes.clear()
    translator.translate(sentences[:3], beam_size=6)
    assert sizes == [1, 1, 1]
    sizes.clear()
    assert [t.tokens for t in translator.translate(sentences, beam_size=1, batch_size=3)] == \
        [t.tokens for t in greedy]
    assert sizes == [3, 3, 1]
