"""The model folder written by the train stage, and loading it without Lightning.

    models/model.pt       {"state_dict", "model_config", "src_vocab_size", "trg_vocab_size",
                           "step", "val_loss"}: plain types, loads with weights_only=True
    models/config.json    resolved params (every section)
    models/tokenizers/    copy of data/processed/tokenizers
    models/run.json       MLflow run hand-off (see nmt.tracking)
    models/checkpoints/   Lightning checkpoints (best, last.ckpt) and state.json, for resuming

Sources must be built with `nmt.data.datamodule.pad_sources` (ids + EOS, then PAD).
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from nmt.config import ConfigError, ModelConfig, Params, parse_params
from nmt.data.vocab import Tokenizer, load_tokenizers
from nmt.io import atomic_path
from nmt.model import Seq2Seq, build_model

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
TOKENIZERS_DIR = "tokenizers"
CHECKPOINTS_DIR = "checkpoints"


def save_model_file(path: Path, state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig,
                    src_vocab_size: int, trg_vocab_size: int, **extra: Any) -> None:
    """Write `model.pt` atomically; `extra` must hold plain types only.

    Same state, same bytes: `torch.save` names its zip archive after the file it writes, so it
    saves to a buffer (archive name `archive`) and the bytes are then written atomically;
    saving straight to the random temporary path would make every file differ.
    """
    payload = {"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
               "model_config": asdict(model_cfg), "src_vocab_size": src_vocab_size,
               "trg_vocab_size": trg_vocab_size, **extra}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


class ModelFileError(ValueError):
    """A file of the model folder is unreadable; the message names it and how to rebuild it."""


def _rebuild(path: Path) -> str:
    return f"rebuild it with `dvc repro train` or restore it with `dvc checkout {path}`"


def load_model_file(path: Path, map_location: str | torch.device = "cpu") -> tuple[Seq2Seq, dict]:
    """Build the model from `model.pt` (weights-only load); returns it in eval mode + payload.

    Raises ModelFileError naming the file when it is not a readable checkpoint of this model
    (truncated, overwritten, or from an incompatible version); FileNotFoundError when missing.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable checkpoint (truncated?); "
                             f"{_rebuild(path)}") from exc
    try:
        model = build_model(ModelConfig(**payload["model_config"]), payload["src_vocab_size"],
                            payload["trg_vocab_size"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: not a checkpoint of this model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                             f"{_rebuild(path)}") from exc
    return model.eval(), payload


def load_config_file(path: Path) -> Params:
    """The resolved params a model folder was trained with (`config.json`).

    Raises ModelFileError naming the file when it is not valid JSON or does not fit the params
    schema of this code; FileNotFoundError when missing.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc}); {_rebuild(path)}") from exc
    try:
        return parse_params(raw)
    except ConfigError as exc:
        raise ModelFileError(f"{path}: {exc.key}: {exc.reason} (written by another version of "
                             f"the code?); {_rebuild(path)}") from exc


def load_model(model_dir: Path, map_location: str | torch.device = "cpu"
               ) -> tuple[Seq2Seq, Tokenizer, Tokenizer, Params]:
    """(model in eval mode, source tokenizer, target tokenizer, resolved params) of a model dir.

    Raises ModelFileError naming an unreadable `model.pt` or `config.json`.
    """
    model_dir = Path(model_dir)
    params = load_config_file(model_dir / CONFIG_FILE)
    model, _ = load_model_file(model_dir / MODEL_FILE, map_location)
    src_tok, trg_tok = load_tokenizers(model_dir / TOKENIZERS_DIR)
    return model, src_tok, trg_tok, params
