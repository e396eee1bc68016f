"""Export stage: portable torch.export programs with a parity check, an MLflow pyfunc logged to the
training run, and registration behind a promotion gate.

Order (nothing touches the registry until everything has been checked):
1. portable export into `out_dir`: `encoder.pt2` and `decoder_step.pt2` (`torch.export.save`),
   `runner.json`, `tokenizers/`, `ATTRIBUTION.md` and the standalone runner `translate.py`
   (a copy of `nmt.export_runner`, torch + sentencepiece only);
2. parity: the runner must return the eager model's tokens, greedy and beam, on
   `export.parity_sentences` test sentences (`ExportError` otherwise); the portable export
   searches the full vocabulary, so it is compared with full-vocabulary eager search;
3. the pyfunc (`nmt.serving`, models-from-code with the `nmt` package in `code/`; weights as
   safetensors; the lexical shortlist `models/shortlist.npz` when there is one) is saved to a
   temporary folder, loaded back and must translate the tutorial's examples into non-empty
   strings;
4. it is logged to the training run (`models/run.json`) and registered as a new version of
   `export.registered_model` (see `register_and_promote` for the gate and the rollback).

An export whose pyfunc content (weights, search defaults, tokenizers, code, pins: see
`content_sha256`) is already registered re-uses that version instead of registering a duplicate,
so `dvc repro -f export` does not grow the registry.
Registry calls use `MlflowClient` here; runs go through `nmt.tracking`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType

import torch
from mlflow import MlflowClient
from torch import Tensor, nn
from torch.export import Dim

import nmt
from nmt import tracking
from nmt.checkpoint import RUN_FILE, TOKENIZERS_DIR, load_model
from nmt.config import ModelConfig, Params, SearchConfig
from nmt.evaluation import TUTORIAL_EXAMPLES
from nmt.io import atomic_dir, write_json
from nmt.model import DecoderState, EncoderOutput, Seq2Seq
from nmt.serving import PYFUNC_NAME, model_code, write_artifacts
from nmt.shortlist import Shortlist
from nmt.translator import Translator

log = logging.getLogger(__name__)

RUNNER_SOURCE = Path(__file__).with_name("export_runner.py")
RUNNER_FILE = "translate.py"
ALIAS_CANDIDATE, ALIAS_CHAMPION = "candidate", "champion"
BLEU_KEY = "test/bleu"
# What the pyfunc imports (nmt.translator pulls in lightning through nmt.data.datamodule).
SERVING_DISTRIBUTIONS = ("mlflow", "torch", "lightning", "sentencepiece", "safetensors", "numpy",
                         "pandas", "pyarrow", "PyYAML", "pydantic")


class ExportError(RuntimeError):
    """An expected export failure (bad inputs, parity, pyfunc check); the registry is unchanged."""


# ------------------------------------------------------------------------- portable programs
def _masked_layer(rnn: nn.LSTM | nn.GRU, layer: int, reverse: bool, x: Tensor,
                  mask: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction of one RNN layer over padded input, state frozen on padding.

    Equivalent to the packed-sequence RNN of `nmt.model.encoder` but exportable with a dynamic
    source length (`torch.export` cannot trace `pack_padded_sequence`).
    Args: x (B, S, I); mask (B, S) True on real tokens. Returns outputs (B, S, H) (0 on padding),
    final hidden (B, H) and final cell (B, H) (None for a GRU).
    """
    from torch._higher_order_ops.scan import scan  # prototype API; parity checks the result

    sfx = f"l{layer}{'_reverse' if reverse else ''}"
    w_hh, b_hh = getattr(rnn, f"weight_hh_{sfx}"), getattr(rnn, f"bias_hh_{sfx}")
    x_proj = x @ getattr(rnn, f"weight_ih_{sfx}").t() + getattr(rnn, f"bias_ih_{sfx}")
    xs, ms = x_proj.transpose(0, 1), mask.transpose(0, 1)[:, :, None]  # (S, B, G), (S, B, 1)
    if reverse:
        xs, ms = xs.flip(0), ms.flip(0)
    h0 = x.new_zeros(x.size(0), rnn.hidden_size)
    lstm = isinstance(rnn, nn.LSTM)

    def lstm_step(carry: tuple[Tensor, Tensor], inp: tuple[Tensor, Tensor]):
        (h, c), (xi, m) = carry, inp
        i, f, g, o = (xi + h @ w_hh.t() + b_hh).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        h_new, c_new = torch.where(m, h_new, h), torch.where(m, c_new, c)
        return (h_new, c_new), h_new * m

    def gru_step(carry: tuple[Tensor], inp: tuple[Tensor, Tensor]):
        (h,), (xi, m) = carry, inp
        gh = h @ w_hh.t() + b_hh
        xr, xz, xn = xi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        h_new = torch.where(m, (1 - z) * torch.tanh(xn + r * hn) + z * h, h)
        return (h_new,), h_new * m

    if lstm:
        (h, c), ys = scan(lstm_step, (h0, h0.clone()), (xs, ms))
    else:
        (h,), ys = scan(gru_step, (h0,), (xs, ms))
        c = None
    if reverse:
        ys = ys.flip(0)
    return ys.transpose(0, 1), h, c


class EncoderProgram(nn.Module):
    """encode + init_state as one exportable function returning the decoder state tuple."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, ...]:
        """src (B, S) long, src_lengths (B,) long -> (hidden, cell, attn_vec, enc_out, mask, keys).

        hidden/cell (L, B, H_dec) (cell zeros for a GRU), attn_vec (B, E), enc_out (B, S, H_enc),
        mask (B, S) bool, keys (B, S, K).
        """
        enc = self.model.encoder
        mask = torch.arange(src.size(1), device=src.device)[None, :] < src_lengths[:, None]
        x = enc.embedding(src)  # (B, S, E); dropout is off in eval mode
        finals: list[tuple[Tensor, Tensor | None]] = []
        for layer in range(enc.layers):
            runs = [_masked_layer(enc.rnn, layer, d == 1, x, mask) for d in range(enc.directions)]
            x = torch.cat([r[0] for r in runs], dim=-1)  # (B, S, D * H)
            finals = [(r[1], r[2]) for r in runs]
        hidden = torch.cat([h for h, _ in finals], dim=-1)  # top layer, (B, D * H)
        cell = None if finals[0][1] is None else torch.cat([c for _, c in finals], dim=-1)
        state = self.model.init_state(EncoderOutput(x, mask, hidden, cell))
        cell_out = state.cell if state.cell is not None else torch.zeros_like(state.hidden)
        return state.hidden, cell_out, state.attn_vec, state.enc_out, state.mask, state.keys


class DecoderStepProgram(nn.Module):
    """`Seq2Seq.step` over the state tuple of `EncoderProgram`."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model
        self.lstm = model.decoder.rnn_kind == "lstm"

    def forward(self, prev: Tensor, hidden: Tensor, cell: Tensor, attn_vec: Tensor,
                enc_out: Tensor, mask: Tensor, keys: Tensor) -> tuple[Tensor, ...]:
        """prev (N,) long + state (N rows) -> (log_probs (N, V), hidden, cell, attn_vec, weights).

        The encoder-side fields (enc_out, mask, keys) never change, so they are not returned.
        """
        state = DecoderState(hidden, cell if self.lstm else None, attn_vec, enc_out, mask, keys)
        log_probs, new, weights = self.model.step(state, prev)
        new_cell = new.cell if new.cell is not None else cell.clone()
        return log_probs, new.hidden, new_cell, new.attn_vec, weights


def export_programs(model: Seq2Seq, out_dir: Path) -> None:
    """torch.export the encoder and the decoder step with dynamic batch and source length."""
    model = model.eval()
    src = torch.tensor([[5, 6, 7, 8, 3], [9, 10, 3, 0, 0], [11, 3, 0, 0, 0]])
    lengths = torch.tensor([5, 3, 2])
    batch, seq = Dim("batch", min=1, max=4096), Dim("src_len", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings():
        # nn.LSTM/GRU re-assign their flat weight list while being traced; harmless here
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")
        enc = torch.export.export(EncoderProgram(model), (src, lengths),
                                  dynamic_shapes=({0: batch, 1: seq}, {0: batch}))
        state = EncoderProgram(model)(src, lengths)
        prev = torch.tensor([2, 2, 2])
        rows = {0: batch}
        step_shapes = (rows, {1: batch}, {1: batch}, rows, {0: batch, 1: seq},
                       {0: batch, 1: seq}, {0: batch, 1: seq})
        step = torch.export.export(DecoderStepProgram(model), (prev, *state),
                                   dynamic_shapes=step_shapes)
    torch.export.save(enc, out_dir / "encoder.pt2")
    torch.export.save(step, out_dir / "decoder_step.pt2")


def write_portable(model: Seq2Seq, model_dir: Path, search: SearchConfig, max_src_tokens: int,
                   attribution: Path, out_dir: Path) -> None:
    """Programs, runner config, tokenizers, runner script and attribution into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    export_programs(model, out_dir)
    write_json(out_dir / "runner.json", {**asdict(search), "max_src_tokens": max_src_tokens,
                                         "torch": torch.__version__})
    shutil.copytree(model_dir / TOKENIZERS_DIR, out_dir / TOKENIZERS_DIR)
    shutil.copy2(RUNNER_SOURCE, out_dir / RUNNER_FILE)
    shutil.copy2(attribution, out_dir / "ATTRIBUTION.md")


def load_runner(export_dir: Path) -> ModuleType:
    """Import the runner shipped in `export_dir` (the copy, not `nmt.export_runner`)."""
    path = Path(export_dir) / RUNNER_FILE
    spec = importlib.util.spec_from_file_location(f"_nmt_export_runner_{id(path)}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------- parity
@dataclass(frozen=True)
class ParityReport:
    """Token-level agreement of the portable runner with the eager model."""

    sentences: int
    beam_size: int
    greedy_mismatches: int
    beam_mismatches: int
    max_score_diff: float
    examples: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.greedy_mismatches == 0 and self.beam_mismatches == 0


def check_parity(translator: Translator, export_dir: Path, sentences: Sequence[str]
                 ) -> ParityReport:
    """Translate `sentences` eagerly and with the exported runner (greedy and beam), compare ids."""
    runner = load_runner(export_dir).PortableTranslator(export_dir)
    beam_size = translator.search.beam_size
    mismatches, examples, max_diff = {}, [], 0.0
    for beam in sorted({1, beam_size}):
        eager = translator.translate(sentences, beam_size=beam, nbest=1)
        port = runner.translate(sentences, beam_size=beam, nbest=1)
        bad = [i for i, (e, p) in enumerate(zip(eager, port, strict=True))
               if e.tokens[0] != p.tokens[0]]
        mismatches[beam] = len(bad)
        examples += [{"beam": beam, "source": sentences[i], "eager": eager[i].text,
                      "portable": port[i].hypotheses[0]} for i in bad[:5]]
        diffs = [abs(e.scores[0] - p.scores[0]) for e, p in zip(eager, port, strict=True)
                 if e.tokens[0] == p.tokens[0] and math.isfinite(e.scores[0])]
        max_diff = max([max_diff, *diffs])
    return ParityReport(len(sentences), beam_size, mismatches[1], mismatches[beam_size],
                        round(max_diff, 8), examples)


def parity_sentences(test_parquet: Path, count: int) -> list[str]:
    """The first `count` distinct English sources of the test split."""
    import pandas as pd

    if not Path(test_parquet).is_file():
        raise ExportError(f"{test_parquet} not found: run `dvc repro vectorize` first")
    english = pd.read_parquet(test_parquet, columns=["en"])["en"]
    return list(dict.fromkeys(english.tolist()))[:count]


# ----------------------------------------------------------------------------------- pyfunc
def pip_requirements() -> list[str]:
    """Exact pins of the serving dependencies, from the installed versions (local tags dropped)."""
    return [f"{dist}=={metadata.version(dist).split('+')[0]}" for dist in SERVING_DISTRIBUTIONS]


def _package_copy(dest: Path) -> Path:
    """A copy of the `nmt` package without caches, for the pyfunc's `code_paths`."""
    src = Path(nmt.__file__).parent
    shutil.copytree(src, dest / "nmt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest / "nmt"


@dataclass(frozen=True)
class PyfuncSpec:
    """Everything `mlflow.pyfunc.save_model` / `log_model` need, built in a temporary folder."""

    python_model: str
    artifacts: dict[str, str]
    code_paths: list[str]
    input_example: tuple[list[str], dict[str, int]]
    pip_requirements: list[str]

    def kwargs(self) -> dict:
        return {"python_model": self.python_model, "artifacts": self.artifacts,
                "code_paths": self.code_paths, "input_example": self.input_example,
                "pip_requirements": self.pip_requirements}


def build_pyfunc_spec(translator: Translator, model_cfg: ModelConfig, model_dir: Path,
                      attribution: Path, work: Path) -> PyfuncSpec:
    """Write the model-code file, the artifacts and the package copy into `work`."""
    (work / "model_code.py").write_text(model_code(), encoding="utf-8")
    artifacts = write_artifacts(work / "artifacts", translator.model, model_cfg,
                                model_dir / TOKENIZERS_DIR, translator.search,
                                translator.max_src_tokens, attribution, translator.shortlist)
    s = translator.search
    example = (list(TUTORIAL_EXAMPLES), {"beam_size": s.beam_size, "nbest": 1,
                                         "batch_size": s.batch_size})
    return PyfuncSpec(str(work / "model_code.py"), artifacts, [str(_package_copy(work / "code"))],
                      example, pip_requirements())


def validate_pyfunc(spec: PyfuncSpec, work: Path) -> list[str]:
    """Save the pyfunc locally, load it back, translate the tutorial's examples."""
    import mlflow

    path = work / "pyfunc"
    mlflow.pyfunc.save_model(path=str(path), **spec.kwargs())
    loaded = mlflow.pyfunc.load_model(str(path))
    out = loaded.predict(list(TUTORIAL_EXAMPLES))
    texts = [o.translation for o in out]
    if len(texts) != len(TUTORIAL_EXAMPLES) or not all(isinstance(t, str) and t for t in texts):
        raise ExportError(f"the pyfunc returned {texts!r} for {list(TUTORIAL_EXAMPLES)!r}; "
                          "expected one non-empty translation each")
    if loaded.metadata.get_params_schema() is None:
        raise ExportError("the pyfunc signature has no params schema")
    return texts


def content_sha256(spec: PyfuncSpec) -> str:
    """sha256 over everything the pyfunc ships: model code, artifacts, `nmt` code, pins.

    Equal hashes mean an identical served model (same weights, search defaults, tokenizers and
    code), which `find_registered` uses to avoid registering duplicates.
    """
    digest = hashlib.sha256()
    roots = [Path(spec.python_model), *map(Path, spec.artifacts.values()), *map(Path,
                                                                              spec.code_paths)]
    for root in roots:
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            digest.update(f"{f.relative_to(root.parent).as_posix()}\0".encode())
            digest.update(f.read_bytes())
    digest.update("\n".join(spec.pip_requirements).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Promotion:
    """Outcome of the promotion gate (written to reports/export/promotion.json)."""

    registered_model: str
    version: str
    model_uri: str
    test_bleu: float
    champion_version_before: str | None
    champion_bleu_before: float | None
    promotion_margin: float
    decision: str  # "promoted" | "kept" | "unchanged" (identical model already registered)
    reason: str
    champion_version: str | None


def decide_promotion(new_bleu: float, champion_bleu: float | None, margin: float
                     ) -> tuple[bool, str]:
    """(promote?, reason): promote when there is no champion or new - champion >= margin."""
    if champion_bleu is None:
        return True, "no champion yet"
    gain = round(new_bleu - champion_bleu, 6)  # BLEU is rounded to 4 decimals upstream
    if gain >= margin:
        return True, f"test/bleu {new_bleu:.4f} beats the champion's {champion_bleu:.4f} " \
                     f"by {gain:.4f} >= margin {margin}"
    return False, f"test/bleu {new_bleu:.4f} vs champion {champion_bleu:.4f}: gain {gain:.4f} " \
                  f"< margin {margin}"


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        version = client.get_registered_model(name).aliases.get(alias)
    except Exception:  # noqa: BLE001 - no such registered model
        return None
    return None if version is None else str(version)  # the SQL store returns ints


def _champion_bleu(client: MlflowClient, name: str, version: str | None) -> float | None:
    if version is None:
        return None
    tag = client.get_model_version(name, version).tags.get("test_bleu")
    if tag is None:
        raise ExportError(f"{name} version {version} (champion) has no test_bleu tag; tag it "
                          "(or move the alias) before exporting")
    return float(tag)


def find_registered(client: MlflowClient, name: str, content_sha: str) -> str | None:
    """Newest version of `name` whose `content_sha256` tag matches, if any."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:  # noqa: BLE001 - no such registered model
        return None
    same = [int(v.version) for v in versions if v.tags.get("content_sha256") == content_sha]
    return str(max(same)) if same else None


def register_and_promote(client: MlflowClient, name: str, model_uri: str, run_id: str | None,
                         test_bleu: float, margin: float,
                         tags: dict[str, str] | None = None) -> Promotion:
    """Register `model_uri` as a new version of `name`, alias it `candidate`, maybe `champion`.

    The champion's BLEU is its version's `test_bleu` tag. The decision is made before the version
    exists and stored in its tags (`test_bleu`, `promotion`, `champion_bleu_before`). If any call
    fails after the version was created, the version is deleted (and the registered model too if
    this call created it) and the previous aliases are restored before the error propagates.
    """
    champion_before = _alias_version(client, name, ALIAS_CHAMPION)
    candidate_before = _alias_version(client, name, ALIAS_CANDIDATE)
    champion_bleu = _champion_bleu(client, name, champion_before)
    promote, reason = decide_promotion(test_bleu, champion_bleu, margin)
    version_tags = {**(tags or {}), "test_bleu": f"{test_bleu}",
                    "promotion": "promoted" if promote else "kept",
                    "champion_bleu_before": "none" if champion_bleu is None
                    else f"{champion_bleu}"}
    created_model = False
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - create it below
        client.create_registered_model(name, description="English->French attention seq2seq "
                                       "(nmt); data CC-BY 2.0 Tatoeba/manythings.org")
        created_model = True
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = None
    try:
        version = client.create_model_version(name, model_uri, run_id=run_id, tags=version_tags,
                                              model_id=model_id).version
        client.set_registered_model_alias(name, ALIAS_CANDIDATE, version)
        if promote:
            client.set_registered_model_alias(name, ALIAS_CHAMPION, version)
    except BaseException:
        _rollback(client, name, version, created_model,
                  {ALIAS_CANDIDATE: candidate_before, ALIAS_CHAMPION: champion_before})
        raise
    return Promotion(name, str(version), f"models:/{name}/{version}", test_bleu, champion_before,
                     champion_bleu, margin, "promoted" if promote else "kept", reason,
                     str(version) if promote else champion_before)


def _rollback(client: MlflowClient, name: str, version: str | None, created_model: bool,
              aliases: dict[str, str | None]) -> None:
    """Undo a half-finished registration (best effort, logged)."""
    try:
        if created_model:
            client.delete_registered_model(name)
            return
        if version is not None:
            client.delete_model_version(name, version)
        for alias, old in aliases.items():
            if old is not None:
                client.set_registered_model_alias(name, alias, old)
    except Exception:  # noqa: BLE001 - keep the original error
        log.exception("rollback of %s version %s failed; check the registry by hand", name,
                      version)
    else:
        log.warning("registration failed: removed %s version %s, aliases restored", name,
                    version)


# ------------------------------------------------------------------------------- the stage
def read_test_bleu(eval_metrics: Path, run: tracking.RunRef) -> float:
    """`test/bleu` from the evaluate report, cross-checked with the run's metric when logged."""
    if not Path(eval_metrics).is_file():
        raise ExportError(f"{eval_metrics} not found: run `dvc repro evaluate` first")
    value = json.loads(Path(eval_metrics).read_text(encoding="utf-8")).get(BLEU_KEY)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ExportError(f"{eval_metrics}: {BLEU_KEY} missing or not a number ({value!r})")
    logged = MlflowClient(run.tracking_uri).get_run(run.run_id).data.metrics.get(BLEU_KEY)
    if logged is not None and abs(logged - value) > 1e-3:
        raise ExportError(f"{eval_metrics} says {BLEU_KEY}={value} but run {run.run_id} logged "
                          f"{logged}: the report belongs to another model; rerun evaluate")
    return float(value)


@dataclass(frozen=True)
class ExportResult:
    parity: ParityReport
    promotion: Promotion
    examples: list[str]


def export(params: Params, model_dir: Path, eval_metrics: Path, test_data: Path, out_dir: Path,
           reports_dir: Path, attribution: Path) -> ExportResult:
    """Run the whole stage (see the module docstring). Raises ExportError on expected failures.

    `reports_dir` gets parity.json once parity ran, and promotion.json always: the gate's outcome,
    or `{"decision": "failed", "reason": ...}` when the export stopped (registry unchanged).
    """
    reports_dir = Path(reports_dir)
    try:
        result = _export(params, Path(model_dir), eval_metrics, test_data, out_dir, reports_dir,
                         attribution)
    except Exception as exc:
        write_json(reports_dir / "promotion.json", {
            "registered_model": params.export.registered_model, "decision": "failed",
            "reason": f"{type(exc).__name__}: {exc}"})
        raise
    write_json(reports_dir / "promotion.json", asdict(result.promotion))
    return result


def _export(params: Params, model_dir: Path, eval_metrics: Path, test_data: Path, out_dir: Path,
            reports_dir: Path, attribution: Path) -> ExportResult:
    if not (model_dir / RUN_FILE).is_file():
        raise ExportError(f"{model_dir / RUN_FILE} not found: run `dvc repro train` first")
    run = tracking.read_run_json(model_dir / RUN_FILE)
    test_bleu = read_test_bleu(eval_metrics, run)
    model, src_tok, trg_tok, model_params = load_model(model_dir)
    translator = Translator(model, src_tok, trg_tok, params.evaluate.search,
                            model_params.vectorize.max_src_tokens,
                            Shortlist.in_model_dir(model_dir))
    sentences = parity_sentences(test_data, params.export.parity_sentences)
    with atomic_dir(out_dir) as tmp_out:  # replaces out_dir only if everything succeeds
        write_portable(model, model_dir, params.evaluate.search, translator.max_src_tokens,
                       attribution, tmp_out)
        # the portable export searches the full vocabulary: compare it with that
        parity = check_parity(translator.without_shortlist(), tmp_out, sentences)
        write_json(reports_dir / "parity.json", asdict(parity) | {"passed": parity.passed})
        if not parity.passed:
            raise ExportError(f"portable export differs from the eager model on "
                              f"{parity.greedy_mismatches} (greedy) / {parity.beam_mismatches} "
                              f"(beam) of {parity.sentences} sentences; see "
                              f"{reports_dir / 'parity.json'}")
        promotion, examples = _publish(params, translator, model_params.model, model_dir,
                                       attribution, run, test_bleu)
    return ExportResult(parity, promotion, examples)


def _publish(params: Params, translator: Translator, model_cfg: ModelConfig, model_dir: Path,
             attribution: Path, run: tracking.RunRef, test_bleu: float
             ) -> tuple[Promotion, list[str]]:
    """Build and check the pyfunc, then log and register it (or re-use a registered twin)."""
    import mlflow

    name, client = params.export.registered_model, MlflowClient(run.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="nmt-pyfunc-") as tmp:
        spec = build_pyfunc_spec(translator, model_cfg, model_dir, attribution, Path(tmp))
        content_sha = content_sha256(spec)
        existing = find_registered(client, name, content_sha)
        if existing is not None:
            log.info("this exact model is already %s version %s: nothing registered", name,
                     existing)
            return _unchanged(client, name, existing, test_bleu, params), []
        examples = validate_pyfunc(spec, Path(tmp))
        with tracking.open_run(model_dir / RUN_FILE) as handle:
            info = mlflow.pyfunc.log_model(name=PYFUNC_NAME, **spec.kwargs())
            promotion = register_and_promote(
                client, name, info.model_uri, run.run_id, test_bleu,
                params.export.promotion_margin,
                {"content_sha256": content_sha, "logged_model_uri": info.model_uri})
            handle.log_dict(asdict(promotion), "export/promotion.json")
            handle.set_tags({"export/registered_version": promotion.version,
                             "export/promotion": promotion.decision})
    log.info("%s version %s: %s (%s)", name, promotion.version, promotion.decision,
             promotion.reason)
    return promotion, examples


def _unchanged(client: MlflowClient, name: str, version: str, test_bleu: float,
               params: Params) -> Promotion:
    mv = client.get_model_version(name, version)
    before = mv.tags.get("champion_bleu_before", "none")
    return Promotion(name, version, f"models:/{name}/{version}", test_bleu,
                     None, None if before == "none" else float(before),
                     params.export.promotion_margin, "unchanged",
                     f"identical model already registered as version {version} "
                     f"({mv.tags.get('promotion')} then)",
                     _alias_version(client, name, ALIAS_CHAMPION))
