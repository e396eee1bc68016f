"""`model.pt`: same weights give the same bytes (DVC sees no change), and it loads back;
`ModelDir`: the model folder's layout."""

from __future__ import annotations

from pathlib import Path

import torch

from nmt.checkpoint import ModelDir, load_model_file, save_model_file
from nmt.config import Params
from nmt.data.vocab import CharTokenizer, save_tokenizers
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


def test_model_dir_owns_the_layout_and_round_trips(tiny_params: Params, tmp_path: Path) -> None:
    """`ModelDir.save` writes the train stage's files under their names; `load` reads them back."""
    torch.manual_seed(0)
    model = build_model(tiny_params.model, 30, 40)
    src, trg = tmp_path / "processed" / "tokenizers", tmp_path / "direct"
    save_tokenizers(src, CharTokenizer.train(["a cat"]), CharTokenizer.train(["un chat"]))
    folder = ModelDir(tmp_path / "models")
    assert folder.missing() == ["model.pt", "config.json", "tokenizers"]
    assert not (folder.has_model() or folder.has_run() or folder.has_shortlist())

    for _ in range(2):  # a second save replaces the folder's files in place
        folder.save(tiny_params, model.state_dict(), 30, 40, src, step=3, val_loss=2.0)
    save_model_file(trg / "model.pt", model.state_dict(), tiny_params.model, 30, 40, step=3,
                    val_loss=2.0)
    assert folder.model_file.read_bytes() == (trg / "model.pt").read_bytes()
    assert sorted(p.name for p in folder.root.iterdir()) == ["config.json", "model.pt",
                                                            "tokenizers"]  # no temp left
    assert sorted(p.name for p in folder.tokenizers_dir.iterdir()) == sorted(
        p.name for p in src.iterdir())
    assert folder.missing() == [] and folder.has_model()
    assert (folder.run_file, folder.shortlist_file, folder.last_checkpoint, folder.export_dir) == (
        tmp_path / "models/run.json", tmp_path / "models/shortlist.npz",
        tmp_path / "models/checkpoints/last.ckpt", tmp_path / "models/export")

    loaded, src_tok, trg_tok, params = folder.load()
    assert params == tiny_params
    assert (src_tok.vocab_size, trg_tok.vocab_size) == (CharTokenizer.train(["a cat"]).vocab_size,
                                                        CharTokenizer.train(["un chat"]).vocab_size)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
