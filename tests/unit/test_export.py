"""Export pieces without a registry: promotion rule, request limits, pins,
the search code the export ships, and parity of the portable export on two random models (see
MODELS)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from mlflow.exceptions import MlflowException

import nmt
from factories import tiny_model_cfg, tiny_transformer_cfg
from nmt import text
from nmt.config import SearchConfig
from nmt.data.vocab import CharTokenizer, save_tokenizers
from nmt.export import runner as export_runner
from nmt.export.parity import check_parity
from nmt.export.programs import RUNNER_FILE, SHIPPED_MODULES, load_runner, write_portable
from nmt.export.pyfunc import pip_requirements
from nmt.model import build_model
from nmt.registry import decide_promotion
from nmt.serving import MAX_CHARS, MAX_SENTENCES, check_request
from nmt.translator import Translator

REPO = Path(__file__).resolve().parents[2]
SENTENCES = ["Be nice.", "Drop it!", "Get out!", "I am here.", "Go.", "Tom ate an apple today.",
             "", "Who?"]


@pytest.mark.parametrize(("new", "champion", "margin", "promote"), [
    (10.0, None, 0.5, True),     # first version
    (10.0, 10.0, 0.5, False),    # equal: not better by the margin
    (10.4, 10.0, 0.5, False),    # better, but by less than the margin
    (10.5, 10.0, 0.5, True),     # better by exactly the margin
    (9.0, 10.0, 0.0, False),     # worse never wins
    (10.0, 10.0, 0.0, True),     # margin 0: ties go to the newer model
])
def test_decide_promotion(new: float, champion: float | None, margin: float,
                          promote: bool) -> None:
    assert decide_promotion(new, champion, margin)[0] is promote


def test_pip_requirements_are_exact_pins() -> None:
    pins = dict(line.split("==") for line in pip_requirements())
    assert pins["torch"] == metadata.version("torch").split("+")[0] == "2.13.0"
    assert {"mlflow", "sentencepiece", "safetensors", "lightning"} <= set(pins)
    assert all(v and "+" not in v for v in pins.values())


@pytest.mark.parametrize(("sentences", "params", "message"), [
    (["a"] * (MAX_SENTENCES + 1), {}, "split the batch"),
    (["ok", "  "], {}, "input 1: empty"),
    (["x" * (MAX_CHARS + 1)], {}, "characters"),
    (["ok", 3], {}, "expected a string"),
    (["ok"], {"beam_size": 0}, "beam_size"),
    (["ok"], {"beam_size": 2, "nbest": 3}, "nbest"),
    (["ok"], {"batch_size": 0}, "batch_size"),
])
def test_check_request_rejects(sentences: list, params: dict, message: str) -> None:
    args = {"beam_size": 2, "nbest": 1, "batch_size": 8} | params
    with pytest.raises(MlflowException, match=message) as info:
        check_request(sentences, **args)
    assert info.value.get_http_status_code() == 400


def test_check_request_accepts_limits() -> None:
    check_request(["x" * MAX_CHARS] * MAX_SENTENCES, beam_size=16, nbest=16, batch_size=256)


# Two random models between them cover LSTM and GRU, 1 and 2 layers, uni- and bidirectional
# encoders, the four attentions' code paths (bahdanau/luong_dot here; luong_general and none share
# the Luong step), input feeding and tied/untied embeddings.
MODELS = {
    "lstm": tiny_model_cfg(enc_layers=2, dec_layers=2, attention="bahdanau",
                           input_feeding=True, dropout=0.1, tie_embeddings=False),
    "gru": tiny_model_cfg(rnn="gru", bidirectional=False, attention="luong_dot"),
    # KV-cache state (dynamic target length), learned positions, dropout off in eval
    "transformer": tiny_model_cfg(
        arch="transformer", rnn="gru", bidirectional=False, attention="luong_dot",
        transformer=tiny_transformer_cfg(layers=2, dropout=0.1, positions="learned")),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def random_export(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A random model with char tokenizers, exported once per configuration."""
    root = tmp_path_factory.mktemp(f"random_export_{request.param}")
    src_tok = CharTokenizer.train(SENTENCES)
    trg_tok = CharTokenizer.train(["Sois gentil.", "Laisse tomber !", "Dehors !"])
    save_tokenizers(root / "model" / "tokenizers", src_tok, trg_tok)
    torch.manual_seed(0)
    model = build_model(MODELS[request.param], src_tok.vocab_size, trg_tok.vocab_size).eval()
    search = SearchConfig(beam_size=3, length_penalty=0.6, max_len_ratio=1.0, max_len_offset=4,
                          nbest=1, batch_size=3)
    translator = Translator(model, src_tok, trg_tok, search, max_src_tokens=12)
    write_portable(model, root / "model", search, 12, REPO / "data/external/ATTRIBUTION.md",
                   root / "export")
    return {"translator": translator, "dir": root / "export", "rnn": request.param}


@pytest.mark.slow
def test_portable_export_matches_eager(random_export: dict) -> None:
    report = check_parity(random_export["translator"], random_export["dir"], SENTENCES)
    assert report.passed, report.examples
    assert (report.sentences, report.beam_size) == (len(SENTENCES), 3)
    assert report.max_score_diff < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("random_export", ["gru"], indirect=True)
def test_portable_runner_batches_like_the_translator(random_export: dict,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a batch size both keep the configured beam's hypotheses per batch (3 x 3 here):
    greedy takes 9 sentences at a time, beam 3 takes 3, an explicit size is kept."""
    runner = load_runner(random_export["dir"]).PortableTranslator(random_export["dir"])
    sizes: list[int] = []
    search = runner.search

    def spy(src: torch.Tensor, src_lengths: torch.Tensor, beam_size: int, nbest: int = 1):
        sizes.append(src.size(0))
        return search(src, src_lengths, beam_size, nbest)

    monkeypatch.setattr(runner, "search", spy)
    sentences = [s for s in SENTENCES if s] * 2  # 14 non-empty
    translator = random_export["translator"]
    for beam, batch, expected in ((1, None, [9, 5]), (3, None, [3, 3, 3, 3, 2]),
                                 (1, 4, [4, 4, 4, 2])):
        sizes.clear()
        runner.translate(sentences, beam_size=beam, batch_size=batch)
        assert sizes == expected, (beam, batch)
        if batch is None:
            assert translator.search.sentences_per_batch(beam) == expected[0]


@pytest.mark.slow
@pytest.mark.parametrize("random_export", ["lstm"], indirect=True)
def test_portable_runner_runs_without_nmt(random_export: dict) -> None:
    """The copied runner translates in a process where `import nmt` fails."""
    code = ("import runpy, sys; sys.modules['nmt'] = None; "
            f"sys.argv = ['{RUNNER_FILE}', '--nbest', '2', '--beam', '3', 'Go.', 'Who?']; "
            f"runpy.run_path('{RUNNER_FILE}', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=random_export["dir"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["0", "0", "1", "1"]
    assert sorted(p.name for p in random_export["dir"].iterdir()) == [
        "ATTRIBUTION.md", "decoder_step.pt2", "encoder.pt2", "nmt_portable", "runner.json",
        "tokenizers", "translate.py"]


@pytest.mark.slow
@pytest.mark.parametrize("random_export", ["gru"], indirect=True)
def test_portable_runner_runs_the_eager_search_code(random_export: dict) -> None:
    """The export ships `nmt.model.search` (and its helpers) unchanged, and the runner decodes
    with that copy: one search implementation for eager and portable decoding."""
    shipped = random_export["dir"] / export_runner.PACKAGE
    package = Path(nmt.__file__).parent
    assert "model/search.py" in SHIPPED_MODULES
    for rel in SHIPPED_MODULES:
        assert (shipped / rel).read_bytes() == (package / rel).read_bytes(), rel
    runner = load_runner(random_export["dir"]).PortableTranslator(random_export["dir"])
    search_file = Path(runner._search.__file__).resolve()
    assert search_file == (shipped / "model/search.py").resolve()
    assert not search_file.is_relative_to(package.resolve())


@pytest.mark.parametrize("random_export", ["gru"], indirect=True)
def test_portable_runner_normalizes_with_the_shipped_text_module(random_export: dict) -> None:
    """The export ships `nmt/text.py` unchanged and the runner normalises input with that copy,
    so training, eager serving and the portable export share one `normalize`."""
    shipped = random_export["dir"] / export_runner.PACKAGE / "text.py"
    package_text = Path(text.__file__)
    assert "text.py" in SHIPPED_MODULES
    assert shipped.read_bytes() == package_text.read_bytes()
    runner = load_runner(random_export["dir"]).PortableTranslator(random_export["dir"])
    used = Path(runner._normalize.__code__.co_filename).resolve()
    assert used == shipped.resolve()
    assert not used.is_relative_to(package_text.parent.resolve())
    for raw in ["Cours\u202f!\u200b  ", "e\u0301t\u00e9\u00a0?", " a\t\nb ", "x\u00ady"]:
        assert runner._normalize(raw) == text.normalize(raw)
    # the runner feeds that normalisation to the tokenizer: odd spacing translates the same
    plain, odd = runner.translate(["Be nice.", "\u200bBe\u00a0 nice.\u202f"], beam_size=1)
    assert odd.tokens == plain.tokens
