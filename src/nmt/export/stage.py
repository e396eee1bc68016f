"""The export stage: portable export, parity gate, pyfunc check, logging and registration.

Order (nothing touches the registry until everything has been checked):
1. portable export into `out_dir` (`nmt.export.programs`): the programs, the runner and the
   search code eager decoding runs;
2. parity (`nmt.export.parity`): the runner must return the eager model's tokens, greedy and
   beam, on `export.parity_sentences` test sentences (`ExportError` otherwise); the portable
   export searches the full vocabulary, so it is compared with full-vocabulary eager search;
3. the pyfunc (`nmt.export.pyfunc`) is saved to a temporary folder, loaded back and must
   translate the tutorial's examples into non-empty strings;
4. it is logged to the training run (`models/run.json`, through `nmt.tracking`) and registered
   as a new version of `export.registered_model` behind the promotion gate (`nmt.registry`).

An export whose pyfunc content is already registered re-uses that version instead of registering
a duplicate, so `dvc repro -f export` does not grow the registry.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from nmt import registry, tracking
from nmt.checkpoint import ModelDir
from nmt.config import ModelConfig, Params
from nmt.export.errors import ExportError
from nmt.export.parity import ParityReport, check_parity, parity_sentences
from nmt.export.programs import write_portable
from nmt.export.pyfunc import build_pyfunc_spec, content_sha256, validate_pyfunc
from nmt.io import atomic_dir, write_json
from nmt.registry import Promotion
from nmt.serving import PYFUNC_NAME
from nmt.shortlist import Shortlist
from nmt.translator import Translator

log = logging.getLogger(__name__)

BLEU_KEY = "test/bleu"


@dataclass(frozen=True)
class ExportResult:
    parity: ParityReport
    promotion: Promotion
    examples: list[str]


def read_test_bleu(eval_metrics: Path, run: tracking.RunRef) -> float:
    """`test/bleu` from the evaluate report, cross-checked with the run's metric when logged."""
    if not Path(eval_metrics).is_file():
        raise ExportError(f"{eval_metrics} not found: run `dvc repro evaluate` first")
    value = json.loads(Path(eval_metrics).read_text(encoding="utf-8")).get(BLEU_KEY)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ExportError(f"{eval_metrics}: {BLEU_KEY} missing or not a number ({value!r})")
    logged = tracking.logged_metrics(run).get(BLEU_KEY)
    if logged is not None and abs(logged - value) > 1e-3:
        raise ExportError(f"{eval_metrics} says {BLEU_KEY}={value} but run {run.run_id} logged "
                          f"{logged}: the report belongs to another model; rerun evaluate")
    return float(value)


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
    folder = ModelDir(model_dir)
    if not folder.has_run():
        raise ExportError(f"{folder.run_file} not found: run `dvc repro train` first")
    run = tracking.read_run_json(folder.run_file)
    test_bleu = read_test_bleu(eval_metrics, run)
    model, src_tok, trg_tok, model_params = folder.load()
    translator = Translator(model, src_tok, trg_tok, params.evaluate.search,
                            model_params.vectorize.max_src_tokens,
                            Shortlist.load(folder.shortlist_file) if folder.has_shortlist()
                            else None, precision="fp32")
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
        promotion, examples = publish(params, translator, model_params.model, model_dir,
                                      attribution, run, test_bleu)
    return ExportResult(parity, promotion, examples)


def publish(params: Params, translator: Translator, model_cfg: ModelConfig, model_dir: Path,
            attribution: Path, run: tracking.RunRef, test_bleu: float
            ) -> tuple[Promotion, list[str]]:
    """Build and check the pyfunc, then log and register it (or re-use a registered twin)."""
    import mlflow

    name, margin = params.export.registered_model, params.export.promotion_margin
    client = registry.client(run.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="nmt-pyfunc-") as tmp:
        spec = build_pyfunc_spec(translator, model_cfg, model_dir, attribution, Path(tmp))
        content_sha = content_sha256(spec)
        existing = registry.find_registered(client, name, content_sha)
        if existing is not None:
            log.info("this exact model is already %s version %s: nothing registered", name,
                     existing)
            return registry.unchanged(client, name, existing, test_bleu, margin), []
        examples = validate_pyfunc(spec, Path(tmp))
        with tracking.open_run(ModelDir(model_dir).run_file) as handle:
            info = mlflow.pyfunc.log_model(name=PYFUNC_NAME, **spec.kwargs())
            promotion = registry.register_and_promote(
                client, name, info.model_uri, run.run_id, test_bleu, margin,
                {"content_sha256": content_sha, "logged_model_uri": info.model_uri})
            handle.log_dict(asdict(promotion), "export/promotion.json")
            handle.set_tags({"export/registered_version": promotion.version,
                             "export/promotion": promotion.decision})
    log.info("%s version %s: %s (%s)", name, promotion.version, promotion.decision,
             promotion.reason)
    return promotion, examples
