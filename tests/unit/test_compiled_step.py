"""The compiled decoder step (`nmt.compiled_step`): the same decoding as the eager Transformer,
a cache keyed by the weights, and eager decoding (with a warning) wherever it cannot compile."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import nmt.compiled_step as cs
from conftest import REPO
from factories import decode_stepwise, src_trg_batch, tiny_model_cfg
from nmt.config import SearchConfig
from nmt.decode_precision import bf16_copy
from nmt.model import beam_search, build_model, greedy_search
from nmt.serving import (
    COMPILE_ENV,
    INT8_ENV,
    PRECISION_ENV,
    TranslatorModel,
    write_artifacts,
)
from nmt.shortlist import ShortlistModel, output_layer
from nmt.translator import Translator

SENTENCES = ["Be nice.", "Drop it!", "Get out!", "Tom ate an apple.", "Go.", "", "Who?"]
SEARCH = SearchConfig(beam_size=3, length_penalty=0.6, max_len_ratio=1.5, max_len_offset=4,
                      nbest=2, batch_size=3, precision="fp32")


def _batch(tiny: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model = tiny["model"]
    return src_trg_batch(model.src_vocab_size, model.trg_vocab_size)


def test_teacher_forced_steps_match_the_eager_decoder(tiny_compiled: dict) -> None:
    """Every position from the first (empty cache) on: log-probs, weights, the cache."""
    src, lengths, trg_in = _batch(tiny_compiled)
    with torch.inference_mode():
        eager = decode_stepwise(tiny_compiled["model"], src, lengths, trg_in)
        compiled = decode_stepwise(tiny_compiled["compiled"], src, lengths, trg_in)
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-5, rtol=1e-5)
    for field in ("self_k", "self_v"):
        torch.testing.assert_close(getattr(compiled[2], field), getattr(eager[2], field))
    assert compiled[2].self_k.shape == (3, 2, trg_in.size(1), 8)


def test_sources_longer_than_the_compiled_positions_encode_eagerly(tiny_compiled: dict) -> None:
    model = tiny_compiled["model"]
    limit = model.encoder.positions.max_positions
    for length in (1, limit, limit + 3):  # the last one past what the program was built for
        src = torch.arange(length)[None, :] % (model.src_vocab_size - 4) + 4
        lengths = torch.tensor([length])
        with torch.inference_mode():
            eager = model.decoder.init_state(model.encode(src, lengths))
            compiled = tiny_compiled["compiled"].init_state(
                tiny_compiled["compiled"].encode(src, lengths))
        for field in ("enc_out", "mask", "cross_k", "cross_v", "self_k"):
            torch.testing.assert_close(getattr(compiled, field), getattr(eager, field),
                                       atol=1e-5, rtol=1e-5)


def test_pending_row_selections_and_groups(tiny_compiled: dict) -> None:
    """Beam expansion (groups of 3 rows per sentence), a reordering and a dropped sentence:
    the program applies the state's pending row selection and reads each row's own source."""
    src, lengths, _ = _batch(tiny_compiled)
    prev = torch.tensor([2, 5, 6])
    outputs = []
    for model in (tiny_compiled["model"], tiny_compiled["compiled"]):
        with torch.inference_mode():
            state = model.init_state(model.encode(src, lengths))
            _, state, _ = model.step(state, prev)
            state = state.index_select(torch.arange(3).repeat_interleave(3))  # K = 3 each
            lp1, state, _ = model.step(state, torch.arange(9) % 7 + 4)
            state = state.reorder(torch.tensor([2, 0, 1, 3, 3, 5, 8, 6, 7]))  # within groups
            lp2, state, w2 = model.step(state, torch.arange(9) % 5 + 4)
            state = state.index_select(torch.tensor([0, 1, 2, 6, 7, 8]))  # sentence 1 done
            lp3, state, w3 = model.step(state, torch.arange(6) + 4)
        outputs.append((lp1, lp2, w2, lp3, w3, state.self_k))
    for compiled, eager in zip(outputs[1], outputs[0], strict=True):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert not torch.equal(outputs[0][1][0], outputs[0][1][2])  # the reordering mattered


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("shortlisted", [False, True])
@pytest.mark.parametrize("max_rows", [64, 4])
def test_searches_translate_the_same(tiny_compiled: dict, beam: int, shortlisted: bool,
                                     max_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also when the rows cross `MAX_ROWS`: batches above it step eagerly, the rest compiled."""
    monkeypatch.setitem(cs.MAX_ROWS, torch.float32, max_rows)
    compiled_rows: list[int] = []
    run = tiny_compiled["compiled"].decoder._run
    monkeypatch.setattr(tiny_compiled["compiled"].decoder, "_run",
                        lambda flat: compiled_rows.append(flat[0].size(0)) or run(flat))
    src, lengths, _ = _batch(tiny_compiled)
    results = []
    for model in (tiny_compiled["model"], tiny_compiled["compiled"]):
        step_model = model
        if shortlisted:  # every other target id, as `Translator` does with a shortlist
            ids = torch.cat([torch.arange(4), torch.arange(5, model.trg_vocab_size, 2)])
            step_model = ShortlistModel(model, ids, *output_layer(tiny_compiled["model"]))
        results.append(greedy_search(step_model, src, lengths) if beam == 1 else
                       beam_search(step_model, src, lengths, beam_size=beam, nbest=beam))
    eager, compiled = results
    assert compiled_rows and max(compiled_rows) <= max_rows
    if max_rows == 4 and beam == 3:  # 9 rows of 3 sentences step eagerly until 2 are done
        assert min(compiled_rows) < 4 and len(compiled_rows) < 10
    assert compiled.tokens == eager.tokens
    for a, b in zip(compiled.scores, eager.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cache_is_reused_and_keyed_by_the_weights(tiny_compiled: dict,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    def no_compiler(*args: object, **kwargs: object) -> None:
        raise RuntimeError("C++ compiler not found\nsecond line")

    monkeypatch.setattr("torch._inductor.aoti_compile_and_package", no_compiler)
    model, cache = tiny_compiled["model"], tiny_compiled["cache"]
    again = cs.CompiledTransformer.build(model, cache)  # from the cache: no compiler needed
    assert again is not None
    src, lengths, trg_in = _batch(tiny_compiled)
    with torch.inference_mode():
        torch.testing.assert_close(decode_stepwise(again, src, lengths, trg_in)[0],
                                   decode_stepwise(model, src, lengths, trg_in)[0],
                                   atol=1e-5, rtol=1e-5)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.decoder.layers[1].ff.outer.bias[0] += 1.0  # one weight differs: another key
    assert cs.cache_key(other) != cs.cache_key(model)
    with caplog.at_level(logging.WARNING, logger="nmt.compiled_step"):
        assert cs.CompiledTransformer.build(other, cache) is None
    assert ("cannot compile the model (RuntimeError: C++ compiler not found); "
            "decoding eagerly") in caplog.text
    key = cs.cache_key(model)  # no partial file left behind
    assert sorted(p.name for p in cache.iterdir()) == [f"decoder_step-{key}.pt2",
                                                       f"encoder-{key}.pt2"]


def test_damaged_cache_entry_is_rebuilt_not_fatal(tiny_compiled: dict, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_compiled["model"]
    entry = tmp_path / f"encoder-{cs.cache_key(model)}.pt2"
    entry.write_bytes(b"not a package")
    calls = []
    monkeypatch.setattr("torch._inductor.aoti_compile_and_package",
                        lambda *a, **k: calls.append(k) or (_ for _ in ()).throw(OSError("x")))
    with caplog.at_level(logging.WARNING, logger="nmt.compiled_step"):
        assert cs.CompiledTransformer.build(model, tmp_path) is None
    assert f"{entry}: unreadable compiled program" in caplog.text and len(calls) == 1
    assert "decoding eagerly" in caplog.text


def test_unusable_cache_folder_decodes_eagerly(tiny_compiled: dict, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """NMT_COMPILE_CACHE pointing at a file: a warning naming it, eager decoding."""
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file")
    with caplog.at_level(logging.WARNING, logger="nmt.compiled_step"):
        assert cs.CompiledTransformer.build(tiny_compiled["model"], not_a_folder) is None
    assert "cannot compile the model (FileExistsError" in caplog.text
    assert str(not_a_folder) in caplog.text and "decoding eagerly" in caplog.text
    assert not_a_folder.read_text() == "a file"


def test_models_it_does_not_compile_decode_eagerly(tiny_compiled: dict, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    rnn = build_model(tiny_model_cfg(), 12, 14)
    with caplog.at_level(logging.WARNING, logger="nmt.compiled_step"):
        assert cs.CompiledTransformer.build(rnn, tmp_path) is None
        assert cs.CompiledTransformer.build(bf16_copy(tiny_compiled["model"]), tmp_path) is None
    assert "compiled decoding is for the Transformer; this Seq2Seq decodes eagerly" in caplog.text
    assert "needs an fp32 model on CPU (this one: torch.bfloat16 on cpu)" in caplog.text
    assert not list(tmp_path.iterdir())


def test_bf16_programs_match_the_eager_bf16_model(tiny_compiled: dict,
                                                 tiny_compiled_bf16: dict) -> None:
    """bf16 programs against the same bf16 weights run eagerly: equal within bf16 rounding,
    and much closer to them than bf16 is to fp32 would allow to drift."""
    compiled, plain = tiny_compiled_bf16["compiled"], tiny_compiled_bf16["model"]
    assert compiled.dtype == torch.bfloat16 and plain.decoder.norm.weight.dtype == torch.bfloat16
    src, lengths, trg_in = _batch(tiny_compiled)
    with torch.inference_mode():
        eager = decode_stepwise(plain, src, lengths, trg_in)
        out = decode_stepwise(compiled, src, lengths, trg_in)
        fp32 = decode_stepwise(tiny_compiled["model"], src, lengths, trg_in)
    assert out[0].dtype == torch.bfloat16
    torch.testing.assert_close(out[0].float(), eager[0].float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(out[0].float(), fp32[0], atol=0.1, rtol=0.05)
    torch.testing.assert_close(out[1].float(), eager[1].float(), atol=0.02, rtol=0.02)


def test_translator_compiles_in_its_precision(tiny_compiled: dict, tiny_compiled_bf16: dict,
                                              amx: None) -> None:
    translator = _translator(tiny_compiled, precision="bf16")
    assert translator.compile_step(tiny_compiled["cache"])  # the fixture's bf16 programs
    assert translator.compiled and translator.precision == "bf16"
    assert translator._compiled is not None
    assert translator._compiled.dtype == torch.bfloat16
    assert translator._compiled.model is translator._bf16[0]  # the row-bucketed copy
    out = translator.translate(SENTENCES)
    eager = _translator(tiny_compiled, precision="bf16").translate(SENTENCES)
    assert [len(t.hypotheses) for t in out] == [len(t.hypotheses) for t in eager]
    assert all(abs(a.scores[0] - b.scores[0]) < 0.5 for a, b in zip(out, eager, strict=True)
               if a.source)


def _translator(tiny: dict, precision: str = "fp32") -> Translator:
    return Translator(tiny["model"], tiny["src_tok"], tiny["trg_tok"], SEARCH, 12,
                      precision=precision)


def test_translator_compile_step(tiny_compiled: dict, amx: None) -> None:
    translator = _translator(tiny_compiled)
    eager = _translator(tiny_compiled).translate(SENTENCES)
    assert translator.compile_step(tiny_compiled["cache"]) and translator.compiled
    assert translator.precision == "fp32"
    out = translator.translate(SENTENCES)
    assert [t.hypotheses for t in out] == [t.hypotheses for t in eager]
    assert [t.attention.shape for t in out] == [t.attention.shape for t in eager]
    translator.to_precision("bf16")  # programs built for fp32: bf16 decodes eagerly
    assert not translator.compiled
    assert len(translator.translate(SENTENCES)) == len(SENTENCES)
    with pytest.raises(ValueError, match="compiled decoder step and int8 decoding exclude"):
        _translator(tiny_compiled).to_int8().compile_step(tiny_compiled["cache"])


def test_serving_env_compiles_at_load(tiny_compiled: dict, tiny_compiled_bf16: dict,
                                      tmp_path: Path, amx: None,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    artifacts = write_artifacts(tmp_path / "pyfunc", tiny_compiled["model"], tiny_compiled["cfg"],
                                tiny_compiled["model_dir"] / "tokenizers", SEARCH, 12,
                                REPO / "data/external/ATTRIBUTION.md")
    context = SimpleNamespace(artifacts=artifacts)
    monkeypatch.setenv(cs.CACHE_ENV, str(tiny_compiled["cache"]))
    eager = TranslatorModel()
    eager.load_context(context)
    monkeypatch.setenv(COMPILE_ENV, "1")
    served = TranslatorModel()
    served.load_context(context)
    assert served.translator.compiled and not eager.translator.compiled
    got, want = served.predict(SENTENCES[:5]), eager.predict(SENTENCES[:5])
    assert [o.translation for o in got] == [o.translation for o in want]
    assert [o.score for o in got] == pytest.approx([o.score for o in want], abs=1e-5)
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    bf16 = TranslatorModel()
    bf16.load_context(context)  # compiled in bf16 (from the fixture's cache entry)
    assert bf16.translator.compiled and bf16.translator.precision == "bf16"
    assert len(bf16.predict(SENTENCES[:5])) == 5
    monkeypatch.delenv(PRECISION_ENV)
    monkeypatch.setenv(INT8_ENV, "1")
    with pytest.raises(ValueError, match="NMT_COMPILE=1 and NMT_INT8=1 exclude each other: "
                                         "unset one of them"):
        TranslatorModel().load_context(context)
    monkeypatch.delenv(INT8_ENV)
    monkeypatch.setenv(COMPILE_ENV, "yes")
    with pytest.raises(ValueError, match=r"NMT_COMPILE='yes': use 1 \(compile the decoder"):
        TranslatorModel().load_context(context)
