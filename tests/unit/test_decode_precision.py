"""Decoding precision (`evaluate.search.precision`): a bf16 model with fp32 scores, `auto`
falling back to fp32 with one warning on CPUs without bf16 units, fp32 one switch away."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import pytest
import torch

from nmt.config import ConfigError, ModelConfig, SearchConfig, TransformerConfig, _build
from nmt.data.vocab import CharTokenizer
from nmt.decode_precision import Fp32LogProbs, bf16_copy, resolve_decode_precision
from nmt.model import beam_search, build_model
from nmt.translator import Translator

TF = TransformerConfig(layers=1, heads=2, d_model=16, ff_dim=32, dropout=0.0,
                       positions="sinusoidal", max_positions=64)
CFG = ModelConfig(arch="rnn", transformer=TF, rnn="gru", emb_dim=16, hidden=16, enc_layers=1,
                  dec_layers=1, bidirectional=True, attention="luong_general",
                  input_feeding=True, dropout=0.0, tie_embeddings=True)
SEARCH = SearchConfig(beam_size=3, length_penalty=0.6, max_len_ratio=1.0, max_len_offset=3,
                      nbest=1, batch_size=8, precision="fp32")
CHARS = "abcdefghijklmnopqrstuvwxyz .!?'"
SENTENCES = ["go.", "be nice!", "i am here.", "who is it?", "we won.", "it's late.",
             "run away!", "help me.", "they left.", "i see you.", "stop it!", "how odd.",
             "sit down.", "she sings.", "look out!", "no way."]
# bf16 keeps ~3 significant digits of each activation: on this fixed random model some
# near-ties between hypotheses flip; most outputs must stay identical
MIN_SAME_SHARE = 0.75

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class _Evaluate:
    search: SearchConfig


@dataclass(frozen=True)
class PartialParams:
    """Just `evaluate.search` of a config file, read like `nmt.config.load_config_file` does."""

    evaluate: _Evaluate


def _translator(cfg: ModelConfig = CFG, precision: str = "fp32") -> Translator:
    torch.manual_seed(0)
    tok = CharTokenizer(sorted(set(CHARS)))
    model = build_model(cfg, tok.vocab_size, tok.vocab_size)
    return Translator(model, tok, tok, replace(SEARCH, precision=precision), max_src_tokens=20)


def test_cpu_without_bf16_units_auto_decodes_fp32_with_one_warning(
        no_bf16: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nmt.decode_precision"):
        translator = _translator(precision="auto")
    assert translator.precision == "fp32"
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
    assert "evaluate.search.precision auto: this CPU" in caplog.text and "amx_bf16" in caplog.text


def test_explicit_bf16_without_bf16_units_is_refused_naming_the_setting(no_bf16: None) -> None:
    with pytest.raises(ConfigError, match=r"evaluate.search.precision: 'bf16' needs a CPU with "
                                          r"bf16 units \(amx_bf16 or avx512_bf16"):
        _translator(precision="bf16")
    with pytest.raises(ValueError, match=r"^--precision: 'bf16' needs a CPU") as info:
        resolve_decode_precision("bf16", "cpu", key="--precision")
    assert "params.yaml" not in str(info.value)  # a CLI flag, not a params key


def test_auto_is_bf16_with_bf16_units_and_fp32_is_one_switch_away(amx: None) -> None:
    translator = _translator(precision="auto")
    assert translator.precision == "bf16"
    assert translator.to_precision("fp32") is translator and translator.precision == "fp32"
    assert resolve_decode_precision("fp32", "cpu") == "fp32"


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ConfigError, match="evaluate.search.precision: must be one of auto, "
                                          "fp32, bf16, got 'fp16'"):
        replace(SEARCH, precision="fp16")
    with pytest.raises(ValueError, match="NMT_PRECISION: must be one of"):
        resolve_decode_precision("half", "cpu", key="NMT_PRECISION")


def test_configs_written_before_the_setting_decode_fp32_as_before(amx: None) -> None:
    fields = {k: v for k, v in vars(SEARCH).items() if k != "precision"}
    assert SearchConfig(**fields).precision == "fp32"
    raw = {"evaluate": {"search": fields}}
    assert _build(PartialParams, raw).evaluate.search.precision == "fp32"


@pytest.mark.parametrize("arch", ["rnn", "transformer"])
def test_bf16_log_probs_and_scores_stay_fp32(arch: str) -> None:
    model = _translator(replace(CFG, arch=arch)).model
    src = torch.tensor([[5, 6, 7, 3], [8, 9, 3, 0]])
    lengths = torch.tensor([4, 3])
    wrapped = Fp32LogProbs(bf16_copy(model))
    with torch.inference_mode():
        state = wrapped.init_state(wrapped.encode(src, lengths))
        assert state.inner.mask.size() == (2, 4)
        log_probs, _, weights = wrapped.step(state, torch.full((2,), 1))
    result = beam_search(wrapped, src, lengths, beam_size=3, nbest=2)
    assert next(model.parameters()).dtype == torch.float32  # the copy is bf16, not the model
    assert log_probs.dtype == weights.dtype == torch.float32 == state.enc_out.dtype
    assert torch.allclose(log_probs.exp().sum(dim=-1), torch.ones(2), atol=1e-5)
    assert result.scores.dtype == torch.float32 and result.attention[0].dtype == torch.float32


@pytest.mark.parametrize("arch", ["rnn", "transformer"])
@pytest.mark.parametrize("beam", [1, 3])
def test_bf16_decoding_matches_fp32_for_most_sentences(amx: None, arch: str, beam: int) -> None:
    fp32 = _translator(replace(CFG, arch=arch))
    bf16 = _translator(replace(CFG, arch=arch), precision="bf16")
    assert bf16.precision == "bf16"
    ref, out = fp32.translate(SENTENCES, beam_size=beam), bf16.translate(SENTENCES, beam_size=beam)
    same = [a.tokens == b.tokens for a, b in zip(ref, out, strict=True)]
    assert sum(same) / len(same) >= MIN_SAME_SHARE, same
    for a, b, s in zip(ref, out, same, strict=True):
        if s:  # same output: the fp32-accumulated score differs only by bf16 rounding
            assert b.scores[0] == pytest.approx(a.scores[0], abs=0.05 * len(b.tokens[0]) + 0.05)


def test_int8_decodes_in_int8_whatever_the_precision(amx: None) -> None:
    translator = _translator(precision="bf16").to_int8()
    assert translator.int8 and translator.precision == "bf16"
    assert all(t.text is not None for t in translator.translate(SENTENCES[:3]))
