"""Seq2Seq model: shapes, fast path == step function, packing, shape errors, init."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from factories import decode_stepwise, src_trg_batch, tiny_model_cfg
from nmt.model import Seq2Seq, build_model, count_parameters
from nmt.model.decoder import Decoder
from nmt.specials import BOS_ID, PAD_ID

SRC_V, TRG_V = 13, 11
BASE = tiny_model_cfg(emb_dim=6, hidden=5)
COMBOS = [
    (rnn, attention, bidirectional, feeding)
    for rnn, attention, bidirectional, feeding in itertools.product(
        ["lstm", "gru"], ["bahdanau", "luong_dot", "luong_general", "none"], [True, False],
        [False, True])
    if not (feeding and attention == "none")
]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0, **overrides: object) -> Seq2Seq:
    torch.manual_seed(seed)
    return build_model(dataclasses.replace(BASE, **overrides), SRC_V, TRG_V).eval()


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """src (3, 7) with lengths 7, 4, 1 and trg_in (3, 5) with padded tails."""
    return src_trg_batch(SRC_V, TRG_V, seed)


@pytest.mark.parametrize(("rnn", "attention", "bidirectional", "feeding"), COMBOS)
def test_forward_equals_step_by_step(rnn: str, attention: str, bidirectional: bool,
                                     feeding: bool) -> None:
    model = make_model(rnn=rnn, attention=attention, bidirectional=bidirectional,
                       input_feeding=feeding)
    src, lengths, trg_in = make_batch()
    logits = model(src, lengths, trg_in)
    assert logits.shape == (3, 5, TRG_V)
    step_lp, weights, _ = decode_stepwise(model, src, lengths, trg_in)
    assert step_lp.shape == (3, 5, TRG_V) and weights.shape == (3, 5, 7)
    torch.testing.assert_close(logits.log_softmax(-1), step_lp, atol=1e-5, rtol=1e-5)
    assert model.decoder.fast_path == (not feeding and attention != "bahdanau")
    if attention != "none":  # weights: 0 on padding, rows sum to 1
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5))
        assert torch.all(weights[1, :, 4:] == 0) and torch.all(weights[2, :, 1:] == 0)


@pytest.mark.parametrize(("enc_layers", "dec_layers"), [(2, 1), (1, 3)])
def test_multilayer_shapes_and_equivalence(enc_layers: int, dec_layers: int) -> None:
    for feeding in (False, True):
        model = make_model(enc_layers=enc_layers, dec_layers=dec_layers, input_feeding=feeding)
        src, lengths, trg_in = make_batch()
        enc = model.encode(src, lengths)
        assert enc.outputs.shape == (3, 7, 10) and enc.hidden.shape == (3, 10)
        state = model.init_state(enc)
        assert state.hidden.shape == (dec_layers, 3, 10) == state.cell.shape
        step_lp, _, _ = decode_stepwise(model, src, lengths, trg_in)
        torch.testing.assert_close(model(src, lengths, trg_in).log_softmax(-1), step_lp,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_packed_encoder_ignores_padding(rnn: str) -> None:
    model = make_model(rnn=rnn, enc_layers=2)
    src, lengths, trg_in = make_batch()
    alone_src, alone_len = src[1:2, :4], lengths[1:2]
    batch_enc, alone_enc = model.encode(src, lengths), model.encode(alone_src, alone_len)
    torch.testing.assert_close(batch_enc.outputs[1:2, :4], alone_enc.outputs)
    torch.testing.assert_close(batch_enc.hidden[1:2], alone_enc.hidden)
    assert torch.all(batch_enc.outputs[1, 4:] == 0)
    assert batch_enc.mask.tolist()[1] == [True] * 4 + [False] * 3
    torch.testing.assert_close(model(src, lengths, trg_in)[1:2],
                               model(alone_src, alone_len, trg_in[1:2]))


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_unpacked_encoder_equals_packed_without_padding(rnn: str) -> None:
    model = make_model(rnn=rnn, enc_layers=2)
    src, lengths, _ = make_batch()
    full = torch.full((3,), 7)
    packed, plain = model.encode(src, full), model.encode(src, full, pack=False)
    for a, b in zip(packed, plain, strict=True):
        torch.testing.assert_close(a, b)


def test_shape_and_dtype_errors_name_the_argument() -> None:
    model = make_model()
    src, lengths, trg_in = make_batch()
    cases = [
        ((src[0], lengths, trg_in), r"src: expected shape \(B, S\), got \(7,\)"),
        ((src, lengths[:2], trg_in), r"src_lengths: expected shape \(B=3\), got \(2,\)"),
        ((src, lengths, trg_in[:2]), r"trg_in: expected shape \(B=3, T\), got \(2, 5\)"),
        ((src.float(), lengths, trg_in), "src: expected dtype torch.int64"),
        ((src, torch.tensor([8, 4, 1]), trg_in), r"src_lengths: expected values in \[1, 7\]"),
        ((src, torch.tensor([7, 0, 1]), trg_in), r"src_lengths: expected values in \[1, 7\]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args)
    state = model.init_state(model.encode(src, lengths))
    with pytest.raises(ValueError, match=r"prev_tokens: expected shape \(B=3\), got \(4,\)"):
        model.step(state, torch.full((4,), BOS_ID))


def test_state_index_select_and_reorder() -> None:
    model = make_model()
    src, lengths, _ = make_batch()
    state = model.init_state(model.encode(src, lengths))
    idx = torch.tensor([2, 2, 0])
    picked = state.index_select(idx)
    assert picked.hidden.shape == (1, 3, 10) and picked.keys.shape == state.keys.shape
    torch.testing.assert_close(picked.enc_out[0], state.enc_out[2])
    reordered = state.reorder(idx)
    torch.testing.assert_close(reordered.hidden[:, 1], state.hidden[:, 2])
    assert reordered.enc_out is state.enc_out
    lp_a, _, _ = model.step(picked, torch.full((3,), BOS_ID))
    lp_b, _, _ = model.step(state, torch.full((3,), BOS_ID))
    torch.testing.assert_close(lp_a, lp_b[idx])


def test_tied_embeddings_and_init() -> None:
    tied, untied = make_model(), make_model(tie_embeddings=False)
    assert tied.decoder.output.weight is tied.decoder.embedding.weight
    assert count_parameters(untied) - count_parameters(tied) == TRG_V * BASE.emb_dim
    for model in (tied, untied):
        assert torch.all(model.encoder.embedding.weight[PAD_ID] == 0)
        assert torch.all(model.decoder.embedding.weight[PAD_ID] == 0)
        assert torch.all(model.decoder.output.bias == 0)
    std = tied.decoder.embedding.weight[4:].std().item()
    assert 0.2 < std < 0.8  # N(0, emb_dim ** -0.5 = 0.41)


@pytest.mark.parametrize("feeding", [False, True])
def test_training_mode_backward_reaches_every_parameter(feeding: bool) -> None:
    model = make_model(dropout=0.3, input_feeding=feeding, enc_layers=2).train()
    src, lengths, trg_in = make_batch()
    logits = model(src, lengths, trg_in)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), trg_in.flatten(),
                                             ignore_index=PAD_ID)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
    assert torch.all(model.encoder.embedding.weight.grad[PAD_ID] == 0)


def test_decoder_rejects_input_feeding_without_attention() -> None:
    with pytest.raises(ValueError, match="input_feeding"):
        Decoder(rnn="gru", vocab_size=TRG_V, emb_dim=4, enc_dim=4, hidden=4, layers=1,
                attention="none", input_feeding=True, dropout=0.0, tie_embeddings=False)
