"""`model.pt`: same weights give the same bytes (DVC sees no change), and it loads back."""

from __future__ import annotations

from pathlib import Path

import torch

from nmt.checkpoint import load_model_file, save_model_file
from nmt.config import Params
from nmt.model import build_model


def test_same_state_saves_identical_bytes(tiny_params: Params, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_params.model, 30, 40)
    first, second = tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt"
    for path in (first, second, first):  # the third save overwrites the first in place
        save_model_file(path, model.state_dict(), tiny_params.model, 30, 40, step=7,
                        val_loss=1.5)
    assert first.read_bytes() == second.read_bytes()
    assert not [p.name for p in first.parent.iterdir() if p.name != "model.pt"]  # no temp left

    loaded, payload = load_model_file(second)
    assert payload["step"] == 7 and payload["val_loss"] == 1.5
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
