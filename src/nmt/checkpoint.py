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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from nmt.config import ModelConfig, Params, parse_params
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


def load_model_file(path: Path, map_location: str | torch.device = "cpu") -> tuple[Seq2Seq, dict]:
    """Build the model from `model.pt` (weights-only load); returns it in eval mode + payload."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = build_model(ModelConfig(**payload["model_config"]), payload["src_vocab_size"],
                        payload["trg_vocab_size"])
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


def load_model(model_dir: Path, map_location: str | torch.device = "cpu"
               ) -> tuple[Seq2Seq, Tokenizer, Tokenizer, Params]:
    """(model in eval mode, source tokenizer, target tokenizer, resolved params) of a model dir."""
    model_dir = Path(model_dir)
    model, _ = load_model_file(model_dir / MODEL_FILE, map_location)
    src_tok, trg_tok = load_tokenizers(model_dir / TOKENIZERS_DIR)
    params = parse_params(json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8")))
    return model, src_tok, trg_tok, params
