"""The model folder (`ModelDir` owns its layout) and loading it without Lightning.

`ModelDir` is the only reader and writer of the folder's file names; every other module asks it
for a path, a probe or an artifact. Layout:

    models/model.pt       {"state_dict", "model_config", "src_vocab_size", "trg_vocab_size",
                           "step", "val_loss"}: plain types, loads with weights_only=True
    models/config.json    resolved params (every section)
    models/tokenizers/    copy of data/processed/tokenizers
    models/run.json       MLflow run hand-off (see nmt.tracking)
    models/shortlist.npz  optional lexical shortlist (the shortlist stage; see nmt.shortlist)
    models/checkpoints/   Lightning checkpoints (best, last.ckpt) and state.json, for resuming
    models/export/        portable export (written by the export stage, nmt.export.programs)

Sources must be built with `nmt.data.datamodule.pad_sources` (ids + EOS, then PAD).
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nmt.config import ConfigError, ModelConfig, Params, parse_params
from nmt.data.vocab import Tokenizer, load_tokenizers
from nmt.io import atomic_dir, atomic_path, write_json
from nmt.model import Seq2Seq, build_model

# The file names: use `ModelDir`'s paths rather than joining these by hand.
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
TOKENIZERS_DIR = "tokenizers"
SHORTLIST_FILE = "shortlist.npz"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
STATE_FILE = "state.json"  # in CHECKPOINTS_DIR: resume fingerprint and run (nmt.training)
LAST_CKPT = "last.ckpt"  # in CHECKPOINTS_DIR: Lightning's `save_last` checkpoint


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


@dataclass(frozen=True)
class ModelDir:
    """The model folder at `root`: the one owner of its layout, probes and artifact I/O."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def model_file(self) -> Path:
        """`model.pt`: weights and model config (`save_model_file`)."""
        return self.root / MODEL_FILE

    @property
    def config_file(self) -> Path:
        """`config.json`: the resolved params."""
        return self.root / CONFIG_FILE

    @property
    def tokenizers_dir(self) -> Path:
        """`tokenizers/`: the tokenizers the model was trained with."""
        return self.root / TOKENIZERS_DIR

    @property
    def run_file(self) -> Path:
        """`run.json`: the MLflow run hand-off (format: `nmt.tracking`)."""
        return self.root / RUN_FILE

    @property
    def shortlist_file(self) -> Path:
        """`shortlist.npz`: the optional lexical shortlist (format: `nmt.shortlist`)."""
        return self.root / SHORTLIST_FILE

    @property
    def checkpoints_dir(self) -> Path:
        """`checkpoints/`: Lightning checkpoints and the resume state."""
        return self.root / CHECKPOINTS_DIR

    @property
    def state_file(self) -> Path:
        """`checkpoints/state.json`: resume fingerprint and run (`nmt.training`)."""
        return self.checkpoints_dir / STATE_FILE

    @property
    def last_checkpoint(self) -> Path:
        """`checkpoints/last.ckpt`: Lightning's latest checkpoint."""
        return self.checkpoints_dir / LAST_CKPT

    @property
    def export_dir(self) -> Path:
        """`export/`: the portable export."""
        return self.root / EXPORT_DIR

    def missing(self) -> list[str]:
        """Names of the files a trained model needs that the folder lacks (empty: complete)."""
        return [p.name for p in (self.model_file, self.config_file, self.tokenizers_dir)
                if not p.exists()]

    def has_model(self) -> bool:
        """Whether the folder holds a `model.pt` (a train-stage folder, not a pyfunc)."""
        return self.model_file.is_file()

    def has_run(self) -> bool:
        """Whether the folder holds the MLflow run hand-off."""
        return self.run_file.is_file()

    def save(self, params: Params, state_dict: dict[str, torch.Tensor], src_vocab_size: int,
             trg_vocab_size: int, tokenizers_from: Path, **extra: Any) -> None:
        """Write `model.pt`, a copy of the `tokenizers_from` folder and `config.json`, atomically.

        `extra` (plain types only) is stored in `model.pt` next to the weights.
        """
        save_model_file(self.model_file, state_dict, params.model, src_vocab_size,
                        trg_vocab_size, **extra)
        with atomic_dir(self.tokenizers_dir) as tmp:
            shutil.copytree(tokenizers_from, tmp, dirs_exist_ok=True)
        write_json(self.config_file, asdict(params))

    def load_config(self) -> Params:
        """The resolved params (`load_config_file`)."""
        return load_config_file(self.config_file)

    def load_tokenizers(self) -> tuple[Tokenizer, Tokenizer]:
        """The (source, target) tokenizers."""
        return load_tokenizers(self.tokenizers_dir)

    def load(self, map_location: str | torch.device = "cpu"
             ) -> tuple[Seq2Seq, Tokenizer, Tokenizer, Params]:
        """(model in eval mode, source tokenizer, target tokenizer, resolved params).

        Raises ModelFileError naming an unreadable `model.pt` or `config.json`.
        """
        params = self.load_config()
        model, _ = load_model_file(self.model_file, map_location)
        src_tok, trg_tok = self.load_tokenizers()
        return model, src_tok, trg_tok, params

    def has_shortlist(self) -> bool:
        """Whether the folder holds a shortlist (read it with `nmt.shortlist.Shortlist.load`;
        not loaded here, so the train stage does not depend on `nmt.shortlist`)."""
        return self.shortlist_file.exists()


def load_model(model_dir: Path, map_location: str | torch.device = "cpu"
               ) -> tuple[Seq2Seq, Tokenizer, Tokenizer, Params]:
    """(model in eval mode, source tokenizer, target tokenizer, resolved params) of a model dir.

    Raises ModelFileError naming an unreadable `model.pt` or `config.json`.
    """
    return ModelDir(model_dir).load(map_location)
