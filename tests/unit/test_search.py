"""Greedy and beam search: equivalences, stopping, length caps, n-best, and a learned toy task."""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import pytest
import torch
from torch import Tensor, nn

from factories import tiny_model_cfg
from nmt.model import Seq2Seq, beam_search, build_model, greedy_search
from nmt.model.decoder import DecoderState
from nmt.model.encoder import EncoderOutput
from nmt.model.search import max_output_lengths
from nmt.specials import BOS_ID, EOS_ID, PAD_ID

V = 12
BASE = tiny_model_cfg(hidden=6)
CONFIGS = {
    "luong-lstm": {},
    "bahdanau-gru-feeding": {"rnn": "gru", "attention": "bahdanau", "input_feeding": True},
    "none-gru": {"rnn": "gru", "attention": "none", "bidirectional": False},
}


LIVELY = {"luong-lstm": (0, -1.5), "bahdanau-gru-feeding": (0, -1.5), "none-gru": (1, -1.0)}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(eos_bias: float = 0.0, seed: int = 0, **overrides: object) -> Seq2Seq:
    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(BASE, **overrides), V, V).eval()
    with torch.no_grad():
        model.decoder.output.bias[EOS_ID] += eos_bias
    return model


def make_lively_model(name: str) -> Seq2Seq:
    """Untrained model whose outputs end at varied lengths: larger weights, a strong EOS row."""
    seed, eos_bias = LIVELY[name]
    model = make_model(seed=seed, **CONFIGS[name])
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0)
        model.decoder.output.weight[EOS_ID] *= 8.0
        model.decoder.output.bias[EOS_ID] = eos_bias
    return model


def make_src(lengths: list[int], seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    src = torch.randint(4, V, (len(lengths), max(lengths)), generator=gen)
    return src.masked_fill(torch.arange(src.size(1))[None] >= lens[:, None], PAD_ID), lens


@pytest.mark.parametrize("name", list(CONFIGS))
def test_beam_size_one_equals_greedy(name: str) -> None:
    model = make_lively_model(name)
    src, lens = make_src([7, 4, 1, 5, 2, 6])
    greedy = greedy_search(model, src, lens)
    lengths = torch.tensor([len(h[0]) for h in greedy.tokens])
    assert not greedy.hit_max_len.all() and lengths.max() > 0  # EOS at various steps
    beam = beam_search(model, src, lens, beam_size=1, length_penalty=0.0)
    assert beam.tokens == greedy.tokens
    torch.testing.assert_close(beam.scores, greedy.scores)
    assert torch.equal(beam.hit_max_len, greedy.hit_max_len)


def forced_log_prob(model: Seq2Seq, src: Tensor, length: int, hyp: list[int]) -> float:
    """Teacher-forced log P(hyp + EOS | src) through `forward`."""
    trg_in, trg_out = torch.tensor([[BOS_ID, *hyp]]), torch.tensor([[*hyp, EOS_ID]])
    log_probs = model(src[None, :length], torch.tensor([length]), trg_in).log_softmax(-1)
    return log_probs.gather(2, trg_out[..., None]).sum().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_beam_scores_are_normalised_model_scores(name: str) -> None:
    model = make_lively_model(name)
    src, lens = make_src([7, 4, 1, 5])
    result = beam_search(model, src, lens, beam_size=3, nbest=3, length_penalty=0.6)
    for i, (hyps, n) in enumerate(zip(result.tokens, lens.tolist(), strict=True)):
        for j, hyp in enumerate(hyps):
            expected = forced_log_prob(model, src[i], n, hyp) / ((5 + len(hyp) + 1) / 6) ** 0.6
            assert result.scores[i, j].item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sentence_alone_equals_sentence_in_padded_batch(name: str) -> None:
    model = make_lively_model(name)
    src, lens = make_src([3, 7, 1, 5])
    greedy = greedy_search(model, src, lens)
    beam = beam_search(model, src, lens, beam_size=4, nbest=3)
    for i, n in enumerate(lens.tolist()):
        alone_src, alone_len = src[i:i + 1, :n], lens[i:i + 1]
        g = greedy_search(model, alone_src, alone_len)
        b = beam_search(model, alone_src, alone_len, beam_size=4, nbest=3)
        assert g.tokens[0] == greedy.tokens[i] and b.tokens[0] == beam.tokens[i]
        torch.testing.assert_close(g.scores[0], greedy.scores[i])
        torch.testing.assert_close(b.scores[0], beam.scores[i])
        torch.testing.assert_close(b.attention[0], beam.attention[i])


def test_nbest_sorted_distinct_and_attention_rows() -> None:
    model = make_lively_model("luong-lstm")
    src, lens = make_src([6, 2, 4])
    result = beam_search(model, src, lens, beam_size=5, nbest=5)
    assert result.scores.shape == (3, 5)
    assert torch.all(result.scores[:, :-1] >= result.scores[:, 1:])
    assert torch.isfinite(result.scores).all()
    for hyps, attn, n in zip(result.tokens, result.attention, lens.tolist(), strict=True):
        assert len(hyps) == 5 and len({tuple(h) for h in hyps}) == 5
        assert attn.shape == (len(hyps[0]) + 1, n)
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.size(0)))
    best = beam_search(model, src, lens, beam_size=5, nbest=1)
    assert [h[0] for h in result.tokens] == [h[0] for h in best.tokens]


def test_max_length_honoured_exactly_per_sentence() -> None:
    model = make_model(eos_bias=-1e4)  # EOS only when forced at the cap
    src, lens = make_src([7, 4, 1])
    caps = [math.ceil(1.3 * n + 2) for n in lens.tolist()]
    assert max_output_lengths(lens, 1.3, 2).tolist() == caps == [12, 8, 4]
    for result in (greedy_search(model, src, lens, max_len_ratio=1.3, max_len_offset=2),
                   beam_search(model, src, lens, beam_size=3, nbest=3, max_len_ratio=1.3,
                               max_len_offset=2)):
        assert [[len(h) for h in hyps] for hyps in result.tokens] == [[c] * len(hyps) for c, hyps
                                                                       in zip(caps, result.tokens,
                                                                              strict=True)]
        assert result.hit_max_len.tolist() == [True] * 3
        assert [a.shape[0] for a in result.attention] == [c + 1 for c in caps]


class _CountingModel(nn.Module):
    """Wraps a Seq2Seq and counts `step` calls."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model
        self.calls = 0
        self.rows = 0

    def encode(self, src: Tensor, src_lengths: Tensor) -> EncoderOutput:
        return self.model.encode(src, src_lengths)

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        return self.model.init_state(enc)

    def step(self, state: DecoderState, prev: Tensor) -> tuple[Tensor, DecoderState, Tensor]:
        self.calls += 1
        self.rows += prev.numel()
        return self.model.step(state, prev)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_best_stops_sooner_with_the_same_result(name: str) -> None:
    # A sentence is done once its returned n-best can no longer change, so asking for fewer
    # hypotheses decodes fewer rows but returns exactly the best of the full n-best search.
    model = _CountingModel(make_lively_model(name))
    src, lens = make_src([7, 4, 1, 5, 2, 6, 3, 8], seed=3)
    rows = {}
    results = {}
    for nbest in (1, 2, 4):
        model.rows = 0
        results[nbest] = beam_search(model, src, lens,  # type: ignore[arg-type]
                                     beam_size=4, nbest=nbest)
        rows[nbest] = model.rows
    for nbest in (1, 2):
        assert [h[:nbest] for h in results[4].tokens] == results[nbest].tokens
        torch.testing.assert_close(results[4].scores[:, :nbest], results[nbest].scores)
        torch.testing.assert_close(results[4].attention, results[nbest].attention)
    assert rows[1] <= rows[2] <= rows[4] and rows[1] < rows[4]


def test_stop_at_eos_gives_empty_outputs() -> None:
    model = _CountingModel(make_model(eos_bias=100.0))
    src, lens = make_src([5, 2, 3])
    # greedy and 1-best beam stop after one step; 5-best beam (K = 5) after two: step 1 only
    # finishes the one live hypothesis, step 2 the other 4, each far better than any alive.
    for search, calls in ((greedy_search, 1), (partial(beam_search, length_penalty=0.0), 1),
                          (partial(beam_search, length_penalty=0.0, nbest=5), 2),
                          (beam_search, None)):
        model.calls = 0
        result = search(model, src, lens)  # type: ignore[operator]
        assert calls is None or model.calls == calls
        assert [h[0] for h in result.tokens] == [[], [], []]
        assert result.hit_max_len.tolist() == [False] * 3
        assert [tuple(a.shape) for a in result.attention] == [(1, 5), (1, 2), (1, 3)]
        torch.testing.assert_close(result.scores[:, :1], torch.zeros(3, 1), atol=1e-4, rtol=0)


class _BigramModel(nn.Module):
    """Scripted next-token distribution that depends only on the previous token."""

    def __init__(self, table: dict[int, dict[int, float]]) -> None:
        super().__init__()
        probs = torch.full((V, V), 1e-9)
        for prev, row in table.items():
            for tok, p in row.items():
                probs[prev, tok] = p
        self.register_buffer("log_table", probs.log())

    def encode(self, src: Tensor, src_lengths: Tensor) -> EncoderOutput:
        mask = torch.arange(src.size(1))[None] < src_lengths[:, None]
        zeros = torch.zeros(src.size(0), 1)
        return EncoderOutput(mask[..., None].float(), mask, zeros, None)

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        return DecoderState(enc.hidden[None], None, enc.hidden, enc.outputs, enc.mask,
                            enc.outputs)

    def step(self, state: DecoderState, prev: Tensor) -> tuple[Tensor, DecoderState, Tensor]:
        weights = state.mask.float() / state.mask.sum(-1, keepdim=True)
        return self.log_table[prev], state, weights


def test_beam_keeps_searching_after_the_top_beam_ends() -> None:
    # After BOS: EOS 0.4, "4" 0.38, "5" 0.22; after 4: EOS 0.98; after 5: EOS 0.9, "5" 0.1.
    model = _BigramModel({BOS_ID: {EOS_ID: 0.4, 4: 0.38, 5: 0.22}, 4: {EOS_ID: 0.98, 4: 0.02},
                          5: {EOS_ID: 0.9, 5: 0.1}})
    src, lens = make_src([3])
    assert greedy_search(model, src, lens).tokens == [[[]]]  # type: ignore[arg-type]
    plain = beam_search(model, src, lens, beam_size=2, nbest=2,  # type: ignore[arg-type]
                        length_penalty=0.0)
    assert plain.tokens == [[[], [4]]]  # the top beam ended first, the search went on
    one = beam_search(model, src, lens, beam_size=2, nbest=1,  # type: ignore[arg-type]
                      length_penalty=1.0)
    assert one.tokens == [[[4]]]  # the ended [] could still be beaten: not done at step 1
    expected = torch.tensor([[math.log(0.4), math.log(0.38 * 0.98)]])
    torch.testing.assert_close(plain.scores, expected)
    penalised = beam_search(model, src, lens, beam_size=2, nbest=2,  # type: ignore[arg-type]
                            length_penalty=1.0)
    assert penalised.tokens == [[[4], []]]  # GNMT penalty (5 + 2) / 6 lifts the longer one
    expected = torch.tensor([[math.log(0.38 * 0.98) / (7 / 6), math.log(0.4)]])
    torch.testing.assert_close(penalised.scores, expected)


def test_argument_errors_and_training_mode_restored() -> None:
    model = make_model(dropout=0.5).train()
    src, lens = make_src([4, 2])
    with pytest.raises(ValueError, match=r"nbest: must be in \[1, beam_size=2\], got 3"):
        beam_search(model, src, lens, beam_size=2, nbest=3)
    with pytest.raises(ValueError, match="beam_size: must be >= 1"):
        beam_search(model, src, lens, beam_size=0)
    with pytest.raises(ValueError, match="max_len_ratio: must be > 0"):
        greedy_search(model, src, lens, max_len_ratio=0.0)
    with pytest.raises(ValueError, match="src_lengths: expected shape"):
        greedy_search(model, src, lens[:1])
    first, second = beam_search(model, src, lens), beam_search(model, src, lens)
    assert first.tokens == second.tokens  # dropout off while searching
    assert model.training


def _reverse_task(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, list[list[int]]]:
    src, lens = make_src(torch.randint(3, 8, (n,), generator=torch.Generator().manual_seed(
        seed)).tolist(), seed)
    targets = [row[:k][::-1] for row, k in zip(src.tolist(), lens.tolist(), strict=True)]
    width = int(lens.max()) + 1
    trg_in = torch.full((n, width), PAD_ID)
    trg_out = torch.full((n, width), PAD_ID)
    for i, ids in enumerate(targets):
        trg_in[i, : len(ids) + 1] = torch.tensor([BOS_ID, *ids])
        trg_out[i, : len(ids) + 1] = torch.tensor([*ids, EOS_ID])
    return src, lens, trg_in, trg_out, targets


@pytest.mark.slow
@pytest.mark.parametrize("name", ["luong-lstm", "bahdanau-gru-feeding"])
def test_overfit_reverse_task_then_decode(name: str) -> None:
    """Fast path and step loop both learn to reverse 32 sequences; both searches decode them."""
    model = make_model(**{**CONFIGS[name], "emb_dim": 32, "hidden": 32}).train()
    src, lens, trg_in, trg_out, targets = _reverse_task(32, seed=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(80):
        logits = model(src, lens, trg_in)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), trg_out.flatten(),
                                           ignore_index=PAD_ID)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.05
    greedy = greedy_search(model, src, lens)
    beam = beam_search(model, src, lens, beam_size=3)
    assert [h[0] for h in greedy.tokens] == targets
    assert [h[0] for h in beam.tokens] == targets


def _exhaustive(model: nn.Module, src: Tensor, lens: Tensor, cap: int,
                alpha: float) -> list[tuple[list[int], float]]:
    """Every output of one sentence (src (1, S)) up to `cap` tokens, scored like beam search
    (sum of log probs incl. EOS / GNMT penalty; PAD, BOS and -inf tokens never generated, only
    EOS at the cap), best first."""
    state = model.init_state(model.encode(src, lens))
    alive: list[tuple[list[int], float]] = [([], 0.0)]
    prev = torch.tensor([BOS_ID])
    finished = []
    for t in range(cap + 1):
        log_probs, state, _ = model.step(state, prev)
        grown, rows, toks = [], [], []
        for row, (prefix, score) in enumerate(alive):
            for tok, lp in enumerate(log_probs[row].tolist()):
                if tok in (PAD_ID, BOS_ID) or not math.isfinite(lp):
                    continue
                if tok == EOS_ID:
                    finished.append((prefix, (score + lp) / ((5 + t + 1) / 6) ** alpha))
                elif t < cap:
                    grown.append(([*prefix, tok], score + lp))
                    rows.append(row)
                    toks.append(tok)
        if not grown:
            break
        alive, prev = grown, torch.tensor(toks)
        state = state.index_select(torch.tensor(rows))
    return sorted(finished, key=lambda f: -f[1])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_beam_wider_than_the_candidate_set_returns_every_output_exactly(name: str) -> None:
    # V = 12 leaves 10 tokens to generate (UNK, 4..11, EOS): at the first step a beam of K > 6
    # asks for more than the 12 candidates there are (this used to raise "selected index k out
    # of range"). With a cap of 2 tokens a sentence has 1 + 9 + 81 = 91 outputs; a beam of 100
    # keeps them all, so its 91-best is the exhaustive list, in order.
    model = make_lively_model(name)
    src, lens = make_src([4, 2], seed=5)
    result = beam_search(model, src, lens, beam_size=100, nbest=91, max_len_ratio=0.01,
                         max_len_offset=1)
    for b in range(2):
        want = _exhaustive(model, src[b:b + 1], lens[b:b + 1], cap=2, alpha=0.6)
        assert len(want) == 91
        assert result.tokens[b] == [w[0] for w in want]
        torch.testing.assert_close(result.scores[b], torch.tensor([w[1] for w in want]))
    for beam in (7, 12, 64):  # every width past the first step's 12 candidates works
        wide = beam_search(model, src, lens, beam_size=beam, max_len_ratio=0.01,
                           max_len_offset=1)
        assert torch.isfinite(wide.scores).all()
        if beam >= 10:  # all 10 first-step candidates ranked within K: the exhaustive best
            assert [h[0] for h in wide.tokens] == [h[0] for h in result.tokens]


def test_beam_wider_than_each_sentences_shortlist() -> None:
    # Shortlist of 7 ids (4 specials + 3 pieces), and per sentence fewer still: sentence 0 may
    # use UNK and pieces 5 and 9, sentence 1 UNK and piece 9. Beam 8 asks for 16 candidates
    # of 7.
    from nmt.shortlist import ShortlistModel, output_layer

    model = make_lively_model("luong-lstm")
    src, lens = make_src([4, 3], seed=2)
    ids = torch.tensor([0, 1, 2, 3, 5, 7, 9])
    allowed = torch.tensor([[True] * 4 + [True, False, True], [True] * 4 + [False, False, True]])
    wrapped = ShortlistModel(model, ids, *output_layer(model), allowed)
    result = beam_search(wrapped, src, lens, beam_size=8, nbest=3,  # type: ignore[arg-type]
                         max_len_ratio=0.01, max_len_offset=1)
    for b, count in ((0, 1 + 3 + 9), (1, 1 + 2 + 4)):
        alone = ShortlistModel(model, ids, *output_layer(model), allowed[b:b + 1])
        want = _exhaustive(alone, src[b:b + 1], lens[b:b + 1], cap=2, alpha=0.6)
        assert len(want) == count
        assert result.tokens[b] == [w[0] for w in want[:3]]
        torch.testing.assert_close(result.scores[b], torch.tensor([w[1] for w in want[:3]]))


@pytest.mark.parametrize(("beam", "nbest"), [(0, 1), (1, 0), (1, 1), (2, 3), (3, 3), (65, 1),
                                             (200, 200), (-1, -1)])
def test_search_argument_rule_is_the_config_rule_without_upper_bound(beam: int,
                                                                     nbest: int) -> None:
    # one rule (nmt.beam_rule) for params, the CLI and the search; the search has no upper bound
    from nmt.config import beam_problem

    model = make_model()
    src, lens = make_src([3])
    problem = beam_problem(beam, nbest, max_beam=None)
    if problem is None:
        beam_search(model, src, lens, beam_size=beam, nbest=nbest, max_len_offset=1)
    else:
        with pytest.raises(ValueError) as info:
            beam_search(model, src, lens, beam_size=beam, nbest=nbest)
        assert str(info.value) == f"{problem[0]}: {problem[1]}"
