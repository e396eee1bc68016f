"""Row buckets (`nmt.row_buckets`): bf16 products padded to few row counts, same results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmt.row_buckets as rb
from nmt.config import ModelConfig, SearchConfig, TransformerConfig
from nmt.data.vocab import CharTokenizer
from nmt.decode_precision import bf16_copy
from nmt.model import build_model
from nmt.row_buckets import BucketedLinear, bucket_rows, bucketed_linear
from nmt.shortlist import build_shortlist
from nmt.translator import Translator

pytestmark = pytest.mark.usefixtures("one_thread")

PLAIN_LINEAR = F.linear  # before any test patches it

TF = TransformerConfig(layers=1, heads=2, d_model=16, ff_dim=32, dropout=0.0,
                       positions="sinusoidal", max_positions=64)
CFG = ModelConfig(arch="transformer", transformer=TF, rnn="gru", emb_dim=16, hidden=16,
                  enc_layers=1, dec_layers=1, bidirectional=True, attention="luong_general",
                  input_feeding=True, dropout=0.0, tie_embeddings=True)
SENTENCES = ["go.", "be nice!", "i am here.", "who is it?", "we won.", "it's late.",
             "run away!", "help me.", "they left.", "i see you.", "stop it!", "how odd.",
             "sit down.", "she sings.", "look out!", "no way.", "a", "hi there, old friend."]


def test_one_sentence_keeps_its_rows_then_few_sizes_with_little_padding() -> None:
    assert [bucket_rows(m) for m in range(1, 9)] == list(range(1, 9))  # 1 row, then beam 5
    buckets = [bucket_rows(m) for m in range(1, 5001)]
    assert all(b >= m for m, b in enumerate(buckets, start=1))
    assert buckets == sorted(buckets)
    assert all(b - m < max(16, m / 8) for m, b in enumerate(buckets, start=1))
    assert bucket_rows(9) == bucket_rows(16) == 16 and bucket_rows(257) == 288
    assert len(set(buckets[:4096])) <= 60  # 8 exact + 15 below 256 + 8 per doubling above


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bucketed_products_equal_plain_ones_bit_for_bit(dtype: torch.dtype,
                                                        with_bias: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 32, dtype=dtype)
    bias = torch.randn(48, dtype=dtype) if with_bias else None
    for rows in (1, 5, 9, 17, 100, 130, 257, 600):
        x = torch.randn(rows, 32, dtype=dtype)
        assert torch.equal(bucketed_linear(x, weight, bias), F.linear(x, weight, bias)), rows
    x3 = torch.randn(7, 3, 32, dtype=dtype)  # (batch, positions, features): 21 rows
    out = bucketed_linear(x3, weight, bias)
    assert out.shape == (7, 3, 48) and torch.equal(out, F.linear(x3, weight, bias))


def record_linear(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.dtype, int]]:
    """(dtype, rows) of every `F.linear` that `nmt.row_buckets` calls from now on."""
    seen: list[tuple[torch.dtype, int]] = []

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        seen.append((x.dtype, x.size(0)))
        return PLAIN_LINEAR(x, weight, bias)

    monkeypatch.setattr(rb.F, "linear", spy)
    return seen


def test_only_bf16_products_are_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_linear(monkeypatch)
    for dtype in (torch.bfloat16, torch.float32):
        bucketed_linear(torch.ones(9, 4, dtype=dtype), torch.ones(3, 4, dtype=dtype))
    assert seen == [(torch.bfloat16, 16), (torch.float32, 9)]


def test_the_bf16_copy_buckets_every_linear_and_leaves_the_model_alone() -> None:
    model = build_model(CFG, 20, 20)
    copy = bf16_copy(model)
    linears = [m for m in copy.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is BucketedLinear for m in linears)
    assert not any(type(m) is BucketedLinear for m in model.modules())
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())


def _bf16_translator() -> Translator:
    tok = CharTokenizer(sorted(set("".join(SENTENCES))))
    torch.manual_seed(0)
    model = build_model(CFG, tok.vocab_size, tok.vocab_size)
    ids = [tok.encode(s) for s in SENTENCES]
    shortlist = build_shortlist(ids, ids, tok.vocab_size, tok.vocab_size, top_k=3, frequent=2)
    search = SearchConfig(beam_size=3, length_penalty=0.6, max_len_ratio=1.0, max_len_offset=3,
                          nbest=1, batch_size=len(SENTENCES), precision="bf16")
    return Translator(model, tok, tok, search, max_src_tokens=30, shortlist=shortlist)


@pytest.mark.parametrize("beam", [1, 3])
def test_bucketing_changes_no_translation(amx: None, beam: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 decoding with a shortlist, batched: the same tokens and scores with and without
    bucketing, and the bucketed run did pad some products."""
    padded: list[tuple[int, int]] = []

    def recording(rows: int) -> int:
        padded.append((rows, real(rows)))
        return padded[-1][1]

    real = rb.bucket_rows
    monkeypatch.setattr(rb, "bucket_rows", recording)
    translator = _bf16_translator()
    assert translator.precision == "bf16" and translator.shortlist is not None
    bucketed = translator.translate(SENTENCES, beam_size=beam)
    assert any(b != r for r, b in padded)
    monkeypatch.setattr(rb, "bucket_rows", lambda rows: rows)
    exact = _bf16_translator().translate(SENTENCES, beam_size=beam)
    assert [t.tokens for t in bucketed] == [t.tokens for t in exact]
    assert [t.scores for t in bucketed] == [t.scores for t in exact]


def test_products_of_few_rows_run_in_fp32_on_the_bf16_weights(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to FP32_UP_TO rows a bf16 BucketedLinear multiplies in fp32 (faster than a bf16 kernel
    at a handful of rows): exactly the fp32 product of the same bf16 values, rounded to bf16 once,
    so within one bf16 rounding of the bf16 kernel; more rows take the padded bf16 kernel."""
    torch.manual_seed(1)
    layer = nn.Linear(32, 48).to(torch.bfloat16)
    layer.__class__ = BucketedLinear
    seen = record_linear(monkeypatch)
    real = PLAIN_LINEAR
    for rows in (1, 5, rb.FP32_UP_TO):
        x = torch.randn(rows, 32).to(torch.bfloat16)
        out = layer(x)
        assert out.dtype == torch.bfloat16
        expected = real(x.float(), layer.weight.float(), layer.bias.float()).to(torch.bfloat16)
        assert torch.equal(out, expected), rows
        torch.testing.assert_close(out, real(x, layer.weight, layer.bias), rtol=8e-3, atol=1e-2)
    layer(torch.randn(rb.FP32_UP_TO + 1, 32).to(torch.bfloat16))
    assert seen == [(torch.float32, 1), (torch.float32, 5), (torch.float32, rb.FP32_UP_TO),
                    (torch.bfloat16, 16)]
