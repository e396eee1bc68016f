"""Model references for the CLI: a local model folder, a local pyfunc folder or an MLflow URI.

`open_translator` turns one into a translate function with the output type of the pyfunc
(`nmt.serving`), so `nmt translate` prints the same thing whichever the model is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from nmt.serving import Hypothesis, TranslationOutput, to_output


class ModelNotFoundError(LookupError):
    """The model reference points at nothing; the message says which command creates it."""


# (sentences, beam_size, nbest, batch_size) -> one output per sentence; None = model default
TranslateFn = Callable[[list[str], int | None, int | None, int | None], list[TranslationOutput]]


def is_model_uri(ref: str) -> bool:
    """`models:/...`, `runs:/...` or any scheme://... (anything else is a local path)."""
    return ref.startswith(("models:/", "runs:/")) or "://" in ref


def open_translator(ref: str, tracking_uri: str, int8: bool = False,
                    full_vocab: bool = False, precision: str | None = None) -> TranslateFn:
    """A translate function for a local model dir, a local pyfunc dir or an MLflow model URI.

    Local train-stage folders (`model.pt`) use `Translator` directly; everything else is loaded
    as the pyfunc. Empty sentences translate to "" without reaching the model. int8: decode with
    an int8 copy of the model (CPU only). full_vocab: ignore the model's lexical shortlist.
    precision: auto | fp32 | bf16 (None: the model's `evaluate.search.precision`).
    Raises ModelNotFoundError naming the command that creates the missing model.
    """
    if not is_model_uri(ref):
        from nmt.checkpoint import ModelDir  # torch: import late

        path = Path(ref)
        if (path / "MLmodel").is_file():
            return _pyfunc_translate(_load_pyfunc(str(path), int8, full_vocab, precision))
        if ModelDir(path).has_model():
            return _local_translate(path, int8, full_vocab, precision)
        raise ModelNotFoundError(f"no model folder at {path}: create one with `dvc repro train` "
                                 "(or `dvc repro` for the whole pipeline)")
    _check_store(tracking_uri)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if ref.startswith("models:/") and "@" in ref:
        name, alias = ref.removeprefix("models:/").split("@", 1)
        try:
            mlflow.MlflowClient(tracking_uri).get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            raise ModelNotFoundError(
                f"no version of registered model {name!r} has alias {alias!r} in {tracking_uri}: "
                "create one with `dvc repro export` (or `dvc repro` for the whole pipeline)"
            ) from exc
    return _pyfunc_translate(_load_pyfunc(ref, int8, full_vocab, precision))


def _check_store(tracking_uri: str) -> None:
    """Refuse a SQLite store that does not exist (MLflow would create an empty one) or that is
    not a readable SQLite file (TrackingError)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise ModelNotFoundError(f"no MLflow store at {db}: run `dvc repro` (train ... "
                                     "export) first, or set MLFLOW_TRACKING_URI")
        from nmt.tracking import check_sqlite_store

        check_sqlite_store(db)  # TrackingError naming a corrupt file


def _load_pyfunc(ref: str, int8: bool, full_vocab: bool, precision: str | None = None) -> Any:
    import mlflow

    try:
        model = mlflow.pyfunc.load_model(ref)
    except (MlflowException, OSError) as exc:
        raise ModelNotFoundError(f"cannot load {ref}: {exc}; `dvc repro export` registers the "
                                 "project's model") from exc
    python_model = model.unwrap_python_model()
    if full_vocab:
        python_model.translator = python_model.translator.without_shortlist()
    if precision is not None:
        python_model.translator.to_precision(precision, key="--precision")
    if int8:
        python_model.translator.to_int8()
    return model


def _local_translate(model_dir: Path, int8: bool, full_vocab: bool,
                     precision: str | None = None) -> TranslateFn:
    from nmt.translator import Translator

    translator = Translator.from_model_dir(model_dir, int8=int8, shortlist=not full_vocab)
    if precision is not None:
        translator.to_precision(precision, key="--precision")

    def translate(sentences: list[str], beam_size: int | None, nbest: int | None,
                  batch_size: int | None) -> list[TranslationOutput]:
        return [to_output(r) for r in translator.translate(sentences, beam_size, nbest,
                                                           batch_size)]

    return translate


def _pyfunc_translate(model: Any) -> TranslateFn:
    def translate(sentences: list[str], beam_size: int | None, nbest: int | None,
                  batch_size: int | None) -> list[TranslationOutput]:
        params = {k: v for k, v in (("beam_size", beam_size), ("nbest", nbest),
                                    ("batch_size", batch_size)) if v is not None}
        keep = [i for i, s in enumerate(sentences) if s.strip()]
        n = nbest or 1
        out = [TranslationOutput(translation="", score=0.0, truncated=False,
                                 nbest=[Hypothesis(translation="", score=0.0)] * n)
               for _ in sentences]
        if keep:
            try:
                results = model.predict([sentences[i] for i in keep], params=params)
            except MlflowException as exc:  # a request outside the contract
                raise ValueError(exc.message) from exc
            for i, r in zip(keep, results, strict=True):
                out[i] = TranslationOutput.model_validate(
                    r.model_dump() if hasattr(r, "model_dump") else r)
        return out

    return translate
