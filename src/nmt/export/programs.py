"""Portable export: `torch.export` encoder and decoder-step programs, plus the shipped runner and
search code, written into one folder that needs torch (numpy, sentencepiece) but not `nmt`.

    encoder.pt2        (src (B, S), src_lengths (B,)) -> decoder state tuple
    decoder_step.pt2   (prev (N,), *state) -> (log_probs (N, V), hidden, cell, attn_vec,
                       attention (N, S))
    runner.json        decoding settings (`evaluate.search`), max_src_tokens, torch version
    tokenizers/        the model's tokenizer files
    translate.py       the runner (`nmt.export.runner`), a command-line translator
    nmt_portable/      unchanged copies of `SHIPPED_MODULES` (input normalisation, the search the
                       eager model runs, padding and tokenizers), so the runner cannot drift from
                       eager decoding
    ATTRIBUTION.md     corpus licence

These are the attention seq2seq's programs; a `Transformer` exports its own with a KV-cache state
(`nmt.export.transformer_programs`) and the same runner, search and folder layout.
The encoder's RNN is re-implemented with `scan` (`torch.export` cannot trace packed sequences);
the parity check (`nmt.export.parity`) compares the result with the eager model.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.export import Dim

import nmt
from nmt.checkpoint import ModelDir
from nmt.config import SearchConfig
from nmt.export.errors import ExportError
from nmt.export.runner import ENCODER_FILE, PACKAGE, RUNNER_CONFIG, STEP_FILE
from nmt.export.transformer_programs import TRANSFORMER_LAYOUT, export_transformer_programs
from nmt.io import write_json
from nmt.model import DecoderState, EncoderOutput, Seq2Seq, Transformer

RUNNER_SOURCE = Path(__file__).with_name("runner.py")
RUNNER_FILE = "translate.py"
TOKENIZERS = "tokenizers"  # in out_dir; the runner reads it by this name
# `nmt` modules the runner imports from `nmt_portable/` (torch, numpy, sentencepiece and the
# standard library only; they import each other relatively).
SHIPPED_MODULES = ("text.py", "specials.py", "beam_rule.py", "io.py", "model/search.py",
                   "data/padding.py", "data/vocab.py")
# The state tuple of `EncoderProgram` / `DecoderStepProgram` (runner.json "state": see the runner).
STATE_LAYOUT = {"names": ["hidden", "cell", "attn_vec", "enc_out", "mask", "keys"],
                "row_dims": [1, 1, 0, 0, 0, 0], "stepped": 3}


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
    torch.export.save(enc, out_dir / ENCODER_FILE)
    torch.export.save(step, out_dir / STEP_FILE)


def write_search_code(out_dir: Path) -> None:
    """Copy `SHIPPED_MODULES` unchanged into `out_dir/nmt_portable/` (with package markers)."""
    src, dest = Path(nmt.__file__).parent, out_dir / PACKAGE
    for rel in SHIPPED_MODULES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dest / rel)
    for folder in {dest, *((dest / rel).parent for rel in SHIPPED_MODULES)}:
        (folder / "__init__.py").write_text('"""Copied from the `nmt` package by the export '
                                            'stage; do not edit."""\n', encoding="utf-8")


def write_portable(model: Seq2Seq | Transformer, model_dir: Path, search: SearchConfig,
                   max_src_tokens: int, attribution: Path, out_dir: Path) -> None:
    """Programs, runner config, tokenizers, runner, search code and attribution into `out_dir`.

    The programs and runner.json's state layout follow the architecture (`Seq2Seq` here,
    `Transformer` in `nmt.export.transformer_programs`); the runner and search are the same.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, Transformer):
        export_transformer_programs(model, out_dir)
        layout = TRANSFORMER_LAYOUT
    elif isinstance(model, Seq2Seq):
        export_programs(model, out_dir)
        layout = STATE_LAYOUT
    else:
        raise ExportError(f"no portable export for a {type(model).__name__} model")
    write_json(out_dir / RUNNER_CONFIG, {**asdict(search), "max_src_tokens": max_src_tokens,
                                         "state": layout, "torch": torch.__version__})
    shutil.copytree(ModelDir(model_dir).tokenizers_dir, out_dir / TOKENIZERS)
    shutil.copy2(RUNNER_SOURCE, out_dir / RUNNER_FILE)
    write_search_code(out_dir)
    shutil.copy2(attribution, out_dir / "ATTRIBUTION.md")


def load_runner(export_dir: Path) -> ModuleType:
    """Import the runner shipped in `export_dir` (the copy, not `nmt.export.runner`)."""
    path = Path(export_dir) / RUNNER_FILE
    spec = importlib.util.spec_from_file_location(f"_nmt_export_runner_{id(path)}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module
