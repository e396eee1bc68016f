"""Transformer: teacher forcing == incremental decoding, search, masks, config, training.

The portable export and its parity gate run in tests/unit/test_export.py (MODELS)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import asdict

import lightning as L
import pytest
import torch

from conftest import REPO, tiny_raw
from factories import decode_stepwise, src_trg_batch, tiny_model_cfg, tiny_transformer_cfg
from nmt.checkpoint import load_model_file, save_model_file
from nmt.config import ConfigError, ModelConfig, TransformerConfig, load_params, parse_params
from nmt.data.datamodule import Batch
from nmt.lit_module import Seq2SeqModule
from nmt.model import Transformer, TransformerState, beam_search, build_model, greedy_search
from nmt.model.quantize import quantize_int8
from nmt.model.transformer import ENCODER_FIELDS
from nmt.shortlist import ShortlistModel, output_layer
from nmt.specials import BOS_ID, EOS_ID, PAD_ID

SRC_V, TRG_V = 13, 11
TF = tiny_transformer_cfg(layers=2)
CFG = tiny_model_cfg(arch="transformer", transformer=TF, rnn="gru", emb_dim=6, hidden=5)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0, tied: bool = True, **tf: object) -> Transformer:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(CFG, tie_embeddings=tied,
                              transformer=dataclasses.replace(TF, **tf))
    model = build_model(cfg, SRC_V, TRG_V)
    assert isinstance(model, Transformer)
    return model.eval()


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """src (3, 7) with lengths 7, 4, 1 and trg_in (3, 5) with a padded tail."""
    return src_trg_batch(SRC_V, TRG_V, seed)


@pytest.mark.parametrize(("positions", "tied"), [("sinusoidal", True), ("learned", False)])
def test_teacher_forcing_equals_incremental_decoding(positions: str, tied: bool) -> None:
    model = make_model(tied=tied, positions=positions)
    src, lengths, trg_in = make_batch()
    with torch.no_grad():
        forced = model(src, lengths, trg_in).log_softmax(-1)  # (B, T, V)
        stepped, _, state = decode_stepwise(model, src, lengths, trg_in)
    torch.testing.assert_close(stepped, forced, atol=1e-5, rtol=1e-5)
    assert state.self_k.shape == (3, TF.layers, trg_in.size(1), TF.d_model)


def test_a_step_writes_the_cache_once_and_equals_the_masked_path_bit_for_bit() -> None:
    """`TransformerDecoder.step` (cache filled in place, no causal mask for the one new
    position) gives exactly what the general masked path (`_run`, cache concatenated) gives."""
    model = make_model()
    src, lengths, trg_in = make_batch()
    decoder = model.decoder
    with torch.no_grad():
        state = model.init_state(model.encode(src, lengths))
        for t in range(trg_in.size(1)):
            emb = decoder.embed(trg_in[:, t])
            features, new_state, weights = decoder.step(state, emb)
            ref, ref_k, ref_v, ref_weights = decoder._run(state, emb[:, None, :])
            assert torch.equal(features, ref[:, 0]) and torch.equal(weights, ref_weights[:, 0])
            for cache, before, new in ((new_state.self_k, state.self_k, ref_k),
                                       (new_state.self_v, state.self_v, ref_v)):
                assert torch.equal(cache, torch.cat([before, torch.stack(new, dim=1)], dim=2))
            assert new_state.cross_k is state.cross_k and new_state.position == t + 1
            state = new_state


def test_shapes_masks_and_causality() -> None:
    model = make_model()
    src, lengths, trg_in = make_batch()
    with torch.no_grad():
        enc = model.encode(src, lengths)
        assert enc.outputs.shape == (3, 7, TF.d_model)
        assert enc.mask.tolist()[2] == [True] + [False] * 6
        state = model.init_state(enc)
        assert state.cross_k.shape == (3, TF.layers, 7, TF.d_model)
        assert state.self_k.shape == (3, TF.layers, 0, TF.d_model)
        _, weights, _ = decode_stepwise(model, src, lengths, trg_in)  # (B, T, S)
        assert torch.all(weights.masked_select(~enc.mask[:, None, :]) == 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, trg_in.size(1)))
        changed = trg_in.clone()
        changed[:, 3] = 5
        before, after = model(src, lengths, trg_in), model(src, lengths, changed)
    torch.testing.assert_close(before[:, :3], after[:, :3])  # position t sees only <= t
    assert not torch.allclose(before[:, 3:], after[:, 3:])
    with pytest.raises(ValueError, match=r"prev_tokens: expected shape \(N=3\)"):
        model.step(state, torch.tensor([BOS_ID, BOS_ID]))


def test_state_row_selection() -> None:
    model = make_model()
    src, lengths, trg_in = make_batch()
    with torch.no_grad():
        _, _, state = decode_stepwise(model, src, lengths, trg_in[:, :2])
    picked = state.index_select(torch.tensor([2, 0, 0]))  # not in groups: one entry per row
    assert picked.group == 1 and torch.equal(picked.mask, state.mask[[2, 0, 0]])
    assert torch.equal(picked.cache()[1], state.self_v[[2, 0, 0]])
    swapped = state.reorder(torch.tensor([0, 0, 2]))
    assert torch.equal(swapped.cache()[0], state.self_k[[0, 0, 2]])
    assert swapped.self_k is state.self_k  # pending: no copy until the next step
    assert swapped.cross_k is state.cross_k and swapped.enc_out is state.enc_out
    beams = state.index_select(torch.tensor([0, 0, 1, 1, 2, 2]))  # beam expansion, K = 2
    assert beams.group == 2 and beams.num_rows == 6
    assert beams.cross_k is state.cross_k and beams.mask is state.mask  # nothing copied
    kept = beams.index_select(torch.tensor([5, 4, 0, 0]))  # sentence 1 done, reordered
    assert kept.group == 2 and torch.equal(kept.cross_v, state.cross_v[[2, 0]])
    assert torch.equal(kept.cache()[0], state.self_k[[2, 2, 0, 0]])


def test_grouped_state_steps_as_one_entry_per_row() -> None:
    """A beam state sharing each sentence's encoder rows among its hypotheses, with its row
    selections pending, steps as the same rows copied out one by one (the state before)."""
    model = make_model()
    src, lengths, trg_in = make_batch()

    def copied(state: TransformerState, idx: torch.Tensor) -> TransformerState:
        self_k, self_v = state.cache()
        return TransformerState(self_k[idx], self_v[idx], *(
            getattr(state, f)[idx] for f in ENCODER_FIELDS))

    def same(a: tuple, b: tuple) -> None:
        for x, y in zip(a, b, strict=True):
            if isinstance(x, TransformerState):
                assert x.rows is None
                x, y = x.cache(), y.cache()
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        _, _, state = decode_stepwise(model, src, lengths, trg_in[:, :2])
        expand = torch.tensor([0, 0, 1, 1, 2, 2])
        grouped, plain = state.index_select(expand), copied(state, expand)
        assert grouped.group == 2 and plain.group == 1
        prev = torch.tensor([4, 5, 6, 7, 8, 9])  # the hypotheses of a sentence differ now
        (out, grouped, w), (ref, plain, w_ref) = model.step(grouped, prev), model.step(plain, prev)
        same((out, grouped, w), (ref, plain, w_ref))
        for idx in (torch.tensor([1, 0, 3, 3, 4, 5]), torch.tensor([4, 5, 0, 1])):
            grouped = grouped.reorder(idx) if idx.numel() == 6 else grouped.index_select(idx)
            plain = copied(plain, idx)
            prev = prev[idx]
            (out, grouped, w), (ref, plain, w_ref) = (model.step(grouped, prev),
                                                      model.step(plain, prev))
            same((out, grouped, w), (ref, plain, w_ref))
        assert grouped.group == 2 and grouped.mask.size(0) == 2  # sentences 2 and 0 left


def test_tied_embeddings_share_the_output_projection() -> None:
    tied, untied = make_model(tied=True), make_model(tied=False)
    assert tied.decoder.output.weight is tied.decoder.embedding.weight
    assert untied.decoder.output.weight is not untied.decoder.embedding.weight
    assert torch.all(tied.encoder.embedding.weight[PAD_ID] == 0)


def test_beam_one_is_greedy_and_search_stops_at_eos() -> None:
    model = make_model(seed=3)
    src, lengths, _ = make_batch(1)
    greedy = greedy_search(model, src, lengths)
    beam = beam_search(model, src, lengths, beam_size=1, length_penalty=0.0)
    assert beam.tokens == greedy.tokens
    torch.testing.assert_close(beam.scores, greedy.scores)
    assert all(EOS_ID not in hyp for hyps in greedy.tokens for hyp in hyps)


@pytest.mark.parametrize("beam", [1, 3])
def test_a_sentence_decodes_the_same_alone_and_in_a_padded_batch(beam: int) -> None:
    model = make_model(seed=4)
    src, lengths, _ = make_batch(2)
    nbest = 2 if beam > 1 else 1
    search = (lambda s, n: greedy_search(model, s, n)) if beam == 1 else (
        lambda s, n: beam_search(model, s, n, beam_size=beam, nbest=nbest))
    batched = search(src, lengths)
    for row in range(3):
        alone = search(src[row:row + 1, : int(lengths[row])], lengths[row:row + 1])
        assert alone.tokens[0] == batched.tokens[row]
        torch.testing.assert_close(alone.scores[0], batched.scores[row], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.attention[0], batched.attention[row], atol=1e-5,
                                   rtol=1e-5)


def test_full_shortlist_and_int8_decode_through_the_same_search() -> None:
    model = make_model(seed=5)
    src, lengths, _ = make_batch(3)
    wrapped = ShortlistModel(model, torch.arange(TRG_V), *output_layer(model))
    for search in (greedy_search, beam_search):
        plain = search(model, src, lengths)
        cut = wrapped.to_vocabulary(search(wrapped, src, lengths))  # type: ignore[arg-type]
        assert cut.tokens == plain.tokens
        torch.testing.assert_close(cut.scores, plain.scores)
    int8 = beam_search(quantize_int8(model), src, lengths, nbest=2)
    assert len(int8.tokens) == 3 and all(len(h) == 2 for h in int8.tokens)


def test_learned_positions_beyond_the_table_name_the_key() -> None:
    model = make_model(positions="learned", max_positions=4)
    src, lengths, _ = make_batch()
    with pytest.raises(ValueError, match="model.transformer.max_positions=4"):
        model.encode(src, lengths)


def test_fused_attention_equals_the_explicit_softmax_under_masks() -> None:
    # training runs the fused kernel (no weights), decoding the explicit softmax (weights back)
    from nmt.model.transformer_layers import MultiHeadAttention

    torch.manual_seed(0)
    attn = MultiHeadAttention(d_model=8, heads=2, dropout=0.0).eval()
    x, memory = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    allowed = (torch.arange(7)[None, :] < torch.tensor([7, 4, 1])[:, None])[:, None, :]
    causal = (torch.arange(5)[None, :] <= torch.arange(5)[:, None])[None]
    for queries, keys, mask in ((x, memory, allowed), (x, x, causal)):
        explicit, weights = attn(queries, *attn.project_kv(keys), mask, need_weights=True)
        fused, none = attn(queries, *attn.project_kv(keys), mask, need_weights=False)
        torch.testing.assert_close(fused, explicit)
        assert none is None and weights is not None
        assert torch.all(weights.masked_select(~mask.expand_as(weights)) == 0)


def test_bf16_training_runs_the_fused_attention_in_fp32() -> None:
    # the CPU kernel's bf16 backward is ~4x slower than fp32's: with grad under bf16 autocast the
    # kernel runs on fp32 inputs (autocast alone would cast them back to bf16) and rounds its
    # output to bf16 once; inference (no grad) keeps the bf16 kernel
    import torch.nn.functional as F

    from nmt.model.transformer_layers import fused_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 16, 32) for _ in range(3))
    allowed = torch.rand(4, 1, 16, 16) < 0.8
    allowed[..., 0] = True
    low = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    in_fp32 = F.scaled_dot_product_attention(*(t.detach().float() for t in low),
                                             attn_mask=allowed).to(torch.bfloat16)
    in_bf16 = F.scaled_dot_product_attention(*(t.detach() for t in low), attn_mask=allowed)
    assert not torch.equal(in_fp32, in_bf16)  # the two paths are told apart
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_attention(*low, allowed, 0.0)
        with torch.no_grad():
            inferred = fused_attention(*(t.detach() for t in low), allowed, 0.0)
    assert out.dtype == inferred.dtype == torch.bfloat16
    assert torch.equal(out, in_fp32)
    assert torch.equal(inferred, in_bf16)
    ref = [t.detach().float().requires_grad_() for t in low]
    F.scaled_dot_product_attention(*ref, attn_mask=allowed).sum().backward()
    out.float().sum().backward()
    for ours, expected in zip(low, ref, strict=True):
        assert ours.grad is not None and ours.grad.dtype == torch.bfloat16
        torch.testing.assert_close(ours.grad.float(), expected.grad, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kind", ["attention_dropout", "activation_dropout", "dropout"])
def test_each_dropout_applies_in_training_only(kind: str) -> None:
    torch.manual_seed(0)
    model = make_model(**{"dropout": 0.0, kind: 0.5})
    src, lengths, trg_in = make_batch()
    torch.testing.assert_close(model(src, lengths, trg_in), model(src, lengths, trg_in))
    model.train()
    assert not torch.allclose(model(src, lengths, trg_in), model(src, lengths, trg_in))


def test_sinusoids_come_from_a_table_bit_for_bit_and_are_not_saved() -> None:
    """Decoding reads its position from a table computed once; the values are those computed
    on the fly (also in bf16 and past the table's end), and the table is not in the weights."""
    from nmt.model.transformer_layers import Positions, sinusoids

    positions = Positions(kind="sinusoidal", d_model=16, max_positions=32)
    like = torch.zeros(1)
    for start, length in ((0, 1), (7, 1), (0, 32), (5, 20), (31, 1), (30, 5), (40, 3)):
        computed = sinusoids(torch.arange(start, start + length), 16)
        assert torch.equal(positions(start, length, like), computed), (start, length)
        assert torch.equal(positions(start, length, like.bfloat16()),
                           computed.to(torch.bfloat16))
    assert positions.sinusoid_table is not None and positions.sinusoid_table.shape == (32, 16)
    model = make_model()
    assert not any("sinusoid" in name for name in model.state_dict())
    assert Positions(kind="learned", d_model=16, max_positions=8).sinusoid_table is None


def test_no_dropout_modules_when_every_rate_is_zero() -> None:
    # p = 0 builds nn.Identity (no call into ATen at every use); p > 0 a real nn.Dropout
    zero = make_model(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    assert not any(isinstance(m, torch.nn.Dropout) for m in zero.modules())
    some = make_model(dropout=0.1, activation_dropout=0.0)
    # the two stacks' embedding dropout and one per encoder and decoder layer
    assert sum(isinstance(m, torch.nn.Dropout) for m in some.modules()) == 2 + 2 * TF.layers


@pytest.mark.parametrize(("override", "key", "words"), [
    ({"heads": 3}, "model.transformer.d_model", "multiple of model.transformer.heads=3"),
    ({"heads": 0}, "model.transformer.heads", ">= 1"),
    ({"dropout": 1.0}, "model.transformer.dropout", "[0, 1)"),
    ({"attention_dropout": -0.1}, "model.transformer.attention_dropout", "[0, 1)"),
    ({"activation_dropout": 1.0}, "model.transformer.activation_dropout", "[0, 1)"),
    ({"positions": "rotary"}, "model.transformer.positions", "'sinusoidal', 'learned'"),
    ({"d_model": 7, "heads": 1}, "model.transformer.d_model", "even"),
    ({"layer": 2}, "model.transformer.layer", "unknown key"),
])
def test_config_errors_name_the_dotted_key(override: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params(tiny_raw(model={"transformer": override}))
    assert info.value.key == key and words in str(info.value)


def test_arch_is_checked_and_the_default_is_the_transformer() -> None:
    # the Transformer won the equal-CPU-time comparison (reports/compare/rnn_vs_transformer.json)
    assert load_params(REPO / "params.yaml").model.arch == "transformer"
    assert parse_params(tiny_raw(model={"arch": "rnn"})).model.arch == "rnn"
    with pytest.raises(ConfigError, match="model.arch: must be one of 'rnn', 'transformer'"):
        parse_params(tiny_raw(model={"arch": "cnn"}))
    cfg = parse_params(tiny_raw(model={"arch": "transformer"})).model
    assert isinstance(cfg.transformer, TransformerConfig)
    assert ModelConfig(**asdict(cfg)) == cfg  # checkpoints store asdict and rebuild from it


def _batches(count: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(count):
        src, lengths, _ = make_batch(int(torch.randint(0, 100, (1,), generator=gen)))
        trg = torch.randint(4, TRG_V, (3, 6), generator=gen)
        trg[:, 0], trg[:, -1], trg[2, 3] = BOS_ID, EOS_ID, EOS_ID
        trg[2, 4:] = PAD_ID
        out.append(Batch(src, lengths, trg, int((trg[:, 1:] != PAD_ID).sum())))
    return out


def test_training_steps_through_the_lightning_module_and_checkpoint_round_trip(
        tmp_path) -> None:
    params = parse_params(tiny_raw(model={"arch": "transformer"}, train={
        "max_steps": 3, "label_smoothing": 0.1, "warmup_steps": 1, "lr_schedule": "constant"}))
    L.seed_everything(0)
    module = Seq2SeqModule(model=asdict(params.model), train=asdict(params.train),
                           src_vocab_size=SRC_V, trg_vocab_size=TRG_V)
    assert isinstance(module.model, Transformer)
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[Record()])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(
        _batches(3), batch_size=None, collate_fn=lambda b: b))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(start["decoder.output.weight"],
                           module.model.state_dict()["decoder.output.weight"])
    save_model_file(tmp_path / "model.pt", module.model.state_dict(), params.model, SRC_V, TRG_V)
    loaded, payload = load_model_file(tmp_path / "model.pt")
    assert isinstance(loaded, Transformer) and payload["model_config"]["arch"] == "transformer"
    src, lengths, trg_in = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(src, lengths, trg_in),
                                   module.model.eval()(src, lengths, trg_in))



def test_translator_decodes_a_transformer() -> None:
    from nmt.config import SearchConfig
    from nmt.data.vocab import CharTokenizer
    from nmt.translator import Translator

    tok = CharTokenizer(sorted(set("abcdefghij .")))
    torch.manual_seed(0)
    model = build_model(CFG, tok.vocab_size, tok.vocab_size)
    search = SearchConfig(beam_size=3, length_penalty=0.6, max_len_ratio=1.5, max_len_offset=2,
                          nbest=2, batch_size=2)
    out = Translator(model, tok, tok, search, max_src_tokens=12).translate(
        ["abc.", "be ade.", "a"])
    assert [len(t.hypotheses) for t in out] == [2, 2, 2]
    assert out[0].attention.shape == (len(out[0].tokens[0]) + 1, len("abc.") + 1)


# sha256 over (name, bytes) of the initial state_dict of params.yaml's RNN keys (model.arch=rnn),
# seed `seed`, vocab 8000/8000, built by the code before `model.arch` existed (torch as pinned)
RNN_INIT_SHA256 = "33e158a0d95f9f57c05621e456f0c675500ef0ba2295b585f6e19bba8ec17c71"


def test_default_rnn_initial_weights_are_those_from_before_the_transformer() -> None:
    params = load_params(REPO / "params.yaml")
    torch.manual_seed(params.seed)
    model = build_model(dataclasses.replace(params.model, arch="rnn"), 8000, 8000)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    assert digest.hexdigest() == RNN_INIT_SHA256
