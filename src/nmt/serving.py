"""The MLflow pyfunc translator (models-from-code) and its request contract.

The logged model holds no pickle: `model_code()` is the models-from-code file (it only calls
`set_model(TranslatorModel())`), the `nmt` package travels in `code/`, and `load_context` reads
only `weights.safetensors`, `serving.json`, the tokenizer files (sentencepiece / JSON) and ships
`ATTRIBUTION.md` (CC-BY 2.0 corpus notice) as an artifact.

Request contract (`predict`, and `POST /invocations` of `nmt serve` and `mlflow models serve`):
- input: English sentences, a list of strings (REST: `{"inputs": [...]}`), or a DataFrame whose
  first (only) column holds them;
- params (all optional): `beam_size` (1 = greedy, <= MAX_BEAM), `nbest` (<= beam_size),
  `batch_size` (sentences decoded together, <= MAX_SENTENCES; default: the model's, scaled to
  keep its hypotheses per batch at another beam_size);
- output: per sentence `{"translation", "score", "truncated", "nbest": [{"translation",
  "score"}, ...]}`, best first;
- rejected with HTTP 400 / `RequestRejected` (a one-line message that MLflow's server does not
  prefix with the request): non-string values, empty or blank strings, text that is not valid
  Unicode (lone surrogates, e.g. a JSON "\\udcff"), more than MAX_SENTENCES sentences per
  request, more than MAX_CHARS characters in one sentence, out-of-range params. Sentences longer
  than the model's `max_src_tokens` pieces are truncated (`truncated: true`, and a warning in the
  server log), as in evaluation.

Over HTTP, `nmt serve` (`nmt.rest`) puts a guard in front of MLflow's scoring app: bodies over
`nmt.rest.MAX_BODY_BYTES`, other content types than JSON and unparsable or too deeply nested JSON
get a short 400, and no error body carries a stack trace or more than a few hundred characters.

Deploy-time option: with the environment variable `NMT_INT8=1` the server decodes with an int8
copy of the model (`nmt.model.quantize`, CPU only; faster, outputs may differ slightly from
fp32); unset or `0` keeps fp32. `NMT_PRECISION=auto|fp32|bf16` overrides the model's
`evaluate.search.precision` (`nmt.decode_precision`; unset: the model's setting). With
`NMT_COMPILE=1` (`nmt serve --compile`) a Transformer decodes through programs compiled at load in
its decoding precision (`nmt.compiled_step`: about a minute once per model and machine, then
cached in `NMT_COMPILE_CACHE`); one-sentence requests are about 2x faster. It excludes
`NMT_INT8=1`; where compiling fails the server still starts, decoding eagerly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pydantic
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from nmt.config import beam_problem
from nmt.text import unicode_problem

log = logging.getLogger(__name__)

PYFUNC_NAME = "translator"  # LoggedModel name inside the training run
MAX_SENTENCES = 256  # per request; split bigger batches
MAX_CHARS = 1000  # per sentence; the corpus has none above 400 (validate.max_chars)
MAX_BEAM = 16
WEIGHTS, CONFIG, TOKENIZERS, ATTRIBUTION = "weights", "config", "tokenizers", "attribution"
SHORTLIST = "shortlist"  # optional artifact: `nmt.shortlist` file (models exported before lack it)
INT8_ENV = "NMT_INT8"  # "1": decode with an int8 copy of the model (CPU only)
PRECISION_ENV = "NMT_PRECISION"  # auto | fp32 | bf16: decoding precision (unset: the model's)
COMPILE_ENV = "NMT_COMPILE"  # "1": compile a Transformer's encoder and decoder step at load


REEXPORT = "log the model again with `dvc repro export` (or `dvc repro --force export`)"


class ArtifactError(ValueError):
    """A file of a logged pyfunc model is unreadable; the message names it."""


class Hypothesis(pydantic.BaseModel):
    """One translation with its search score (length-normalised log probability for beam)."""

    translation: str
    score: float


class TranslationOutput(pydantic.BaseModel):
    """The best translation of one sentence plus its n-best list (best first)."""

    translation: str
    score: float
    truncated: bool
    nbest: list[Hypothesis]


def model_code() -> str:
    """Source of the models-from-code file logged with the model."""
    return ('"""MLflow models-from-code entry point: nmt.serving.TranslatorModel."""\n'
            "from mlflow.models import set_model\n\n"
            "from nmt.serving import TranslatorModel\n\n"
            "set_model(TranslatorModel())\n")


def write_artifacts(folder: Path, model: Any, model_cfg: Any, tokenizers_dir: Path, search: Any,
                    max_src_tokens: int, attribution: Path,
                    shortlist: Any = None) -> dict[str, str]:
    """Write weights (safetensors), config JSON, tokenizers and attribution; return the mapping.

    `model` is a `Seq2Seq` built from `model_cfg` (`ModelConfig`), `search` a `SearchConfig`,
    `shortlist` an enabled `nmt.shortlist.Shortlist` or None; the JSON records everything
    `build_model` and `Translator` need.
    """
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "weights.safetensors"))  # tied weights are stored once
    config = {"model": asdict(model_cfg), "src_vocab_size": model.src_vocab_size,
              "trg_vocab_size": model.trg_vocab_size, "search": asdict(search),
              "max_src_tokens": max_src_tokens}
    (folder / "serving.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
    shutil.copytree(tokenizers_dir, folder / "tokenizers")
    shutil.copy2(attribution, folder / "ATTRIBUTION.md")
    artifacts = {WEIGHTS: str(folder / "weights.safetensors"),
                 CONFIG: str(folder / "serving.json"), TOKENIZERS: str(folder / "tokenizers"),
                 ATTRIBUTION: str(folder / "ATTRIBUTION.md")}
    if shortlist is not None:
        shortlist.save(folder / "shortlist.npz")
        artifacts[SHORTLIST] = str(folder / "shortlist.npz")
    return artifacts


class RequestRejected(MlflowException):
    """HTTP 400 whose message stays as written.

    MLflow's scoring server rewrites the message of an MlflowException raised by `predict` to
    "Failed to predict data '<the whole request>'. Error: ...", which echoed a 30 MB sentence
    back to its sender; this exception ignores that rewrite, so the body stays short.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property  # type: ignore[override]
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set once, by MlflowException.__init__
            self._message = value


def _bad_request(message: str) -> MlflowException:
    return RequestRejected(message)  # HTTP 400 in the scoring server


def check_request(sentences: list[str], beam_size: int, nbest: int, batch_size: int) -> None:
    """Raise MlflowException (400) when a request is outside the contract above."""
    if len(sentences) > MAX_SENTENCES:
        raise _bad_request(f"{len(sentences)} sentences in one request; the limit is "
                           f"{MAX_SENTENCES}: split the batch")
    for i, text in enumerate(sentences):
        if not isinstance(text, str):
            raise _bad_request(f"input {i}: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise _bad_request(f"input {i}: empty sentence; send non-empty English text")
        if problem := unicode_problem(text):
            raise _bad_request(f"input {i}: {problem}; send UTF-8 text")
        if len(text) > MAX_CHARS:
            raise _bad_request(f"input {i}: {len(text)} characters; the limit is {MAX_CHARS} "
                               "per sentence (this model translates single sentences)")
    if problem := beam_problem(beam_size, nbest, MAX_BEAM):
        raise _bad_request(f"params.{problem[0]}: {problem[1]}")
    if not 1 <= batch_size <= MAX_SENTENCES:
        raise _bad_request(f"params.batch_size: must be in [1, {MAX_SENTENCES}], "
                           f"got {batch_size}")


class TranslatorModel(PythonModel):
    """pyfunc wrapper around `nmt.translator.Translator`."""

    def load_context(self, context: Any) -> None:
        """Build the model from safetensors + JSON and the tokenizers; no unpickling."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        from nmt.config import ModelConfig, SearchConfig
        from nmt.data.vocab import load_tokenizers
        from nmt.model import build_model
        from nmt.shortlist import Shortlist
        from nmt.translator import Translator

        config_path, weights_path = Path(context.artifacts[CONFIG]), context.artifacts[WEIGHTS]
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            model = build_model(ModelConfig(**config["model"]), config["src_vocab_size"],
                                config["trg_vocab_size"])
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise ArtifactError(f"{config_path}: not a readable serving config ({exc}); "
                                f"{REEXPORT}") from exc
        try:
            load_model(model, weights_path)
        except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
            raise ArtifactError(f"{weights_path}: not readable weights of this model (truncated?"
                                f" {type(exc).__name__}: {str(exc)[:200]}); {REEXPORT}") from exc
        src_tok, trg_tok = load_tokenizers(context.artifacts[TOKENIZERS])
        shortlist = (Shortlist.load(context.artifacts[SHORTLIST])
                     if SHORTLIST in context.artifacts else None)
        self.translator = Translator(model.eval(), src_tok, trg_tok,
                                     SearchConfig(**config["search"]), config["max_src_tokens"],
                                     shortlist)
        precision = os.environ.get(PRECISION_ENV, "").strip()
        if precision:
            self.translator.to_precision(precision, key=PRECISION_ENV)
        int8, compiled = int8_requested(), compile_requested()
        if compiled and int8:
            raise ValueError(f"{COMPILE_ENV}=1 and {INT8_ENV}=1 exclude each other: unset one "
                             "of them")
        if int8:
            self.translator.to_int8()
            log.info("%s=1: decoding with an int8 copy of the model", INT8_ENV)
        if compiled:
            self.translator.compile_step()
        log.info("decoding precision: %s%s", "int8" if self.translator.int8
                 else self.translator.precision,
                 ", compiled decoder step" if self.translator.compiled else "")

    def predict(self, model_input: list[str], params: dict[str, Any] | None = None
                ) -> list[TranslationOutput]:
        """Translate English sentences; see the module docstring for the contract."""
        search = self.translator.search
        params = params or {}
        beam = int(params.get("beam_size", search.beam_size))
        nbest = int(params.get("nbest", 1))
        batch = int(params.get("batch_size", min(search.sentences_per_batch(beam),
                                                  MAX_SENTENCES)))
        sentences = list(model_input)
        check_request(sentences, beam, nbest, batch)
        results = self.translator.translate(sentences, beam_size=beam, nbest=nbest,
                                            batch_size=batch)
        return [to_output(r) for r in results]


def int8_requested() -> bool:
    """The `NMT_INT8` deploy setting: "1" = int8, "" / "0" / unset = fp32, else an error."""
    return _switch(INT8_ENV, "int8 decoding on CPU", "fp32")


def compile_requested() -> bool:
    """The `NMT_COMPILE` deploy setting: "1" = compiled decoder step, "" / "0" / unset = eager,
    else an error."""
    return _switch(COMPILE_ENV, "compile the decoder step at load", "eager")


def _switch(name: str, on: str, off: str) -> bool:
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{name}={value!r}: use 1 ({on}) or 0 ({off})")
    return value == "1"


def to_output(result: Any) -> TranslationOutput:
    """`nmt.translator.Translation` -> TranslationOutput (hypotheses with -inf scores dropped)."""
    return TranslationOutput(
        translation=result.text, score=result.scores[0], truncated=result.truncated,
        nbest=[Hypothesis(translation=h, score=s)
               for h, s in zip(result.hypotheses, result.scores, strict=True) if math.isfinite(s)])
