"""Standalone English->French translator over the portable export: needs torch, numpy (and
sentencepiece for sentencepiece tokenizers), never the installed `nmt` package.

The export stage (`nmt.export.programs`) copies this file to `models/export/translate.py` next to
the exported programs, `runner.json`, `tokenizers/` and `nmt_portable/`: unchanged copies of
`nmt.text` (input normalisation), `nmt.model.search`, `nmt.data.padding`, `nmt.data.vocab` (and
what they import). Decoding runs
that same search code, driven through its step protocol (`encode`, `init_state`, `step`) by
`ExportedModel`, so the portable export and eager decoding cannot drift apart; the export stage
still checks their tokens on test sentences before anything is registered.

Usage:
    python translate.py "Be nice." "Get out!"
    printf 'Drop it!\\n' | python translate.py --beam 5 --nbest 3

The decoder state is a tuple of tensors described by `runner.json`'s "state" entry: field names,
the dimension that holds the rows of each, and how many leading fields the decoder-step program
returns updated (the rest, encoder-side, never change). The attention seq2seq state is
(hidden (L, N, H), cell (L, N, H), attn_vec (N, E), enc_out (N, S, H_enc), mask (N, S),
keys (N, S, K)), rows on dims (1, 1, 0, 0, 0, 0), three fields stepped; another architecture
exports its own programs and layout and needs nothing else here.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

RUNNER_CONFIG = "runner.json"
ENCODER_FILE = "encoder.pt2"
STEP_FILE = "decoder_step.pt2"
PACKAGE = "nmt_portable"  # the shipped `nmt` modules

def load_shipped(export_dir: Path, module: str) -> ModuleType:
    """`nmt_portable.<module>` from `export_dir`, imported under a name unique to that folder."""
    folder = Path(export_dir).resolve() / PACKAGE
    name = f"{PACKAGE}_{hashlib.sha256(str(folder).encode()).hexdigest()[:12]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        if spec is None or spec.loader is None:
            raise FileNotFoundError(f"{folder}: not a portable export's {PACKAGE} folder")
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.{module}")


@dataclass(frozen=True)
class StateLayout:
    """The decoder state tuple: field names, the row dimension of each, fields a step updates."""

    names: tuple[str, ...]
    row_dims: tuple[int, ...]
    stepped: int  # the first `stepped` fields are returned updated by the decoder-step program

    @classmethod
    def from_json(cls, raw: dict) -> StateLayout:
        return cls(tuple(raw["names"]), tuple(raw["row_dims"]), int(raw["stepped"]))


class ExportedState:
    """Decoder state between exported steps (N rows), with the search's row selections."""

    def __init__(self, layout: StateLayout, fields: Sequence[Tensor]) -> None:
        self.layout, self.fields = layout, tuple(fields)

    def _field(self, name: str) -> Tensor:
        return self.fields[self.layout.names.index(name)]

    @property
    def mask(self) -> Tensor:
        """(N, S) bool, True on real source tokens."""
        return self._field("mask")

    @property
    def enc_out(self) -> Tensor:
        """(N, S, H_enc) encoder outputs."""
        return self._field("enc_out")

    def index_select(self, idx: Tensor) -> ExportedState:
        """Rows `idx` (M,) of every field."""
        return ExportedState(self.layout, [f.index_select(d, idx) for f, d in
                                           zip(self.fields, self.layout.row_dims, strict=True)])

    def reorder(self, idx: Tensor) -> ExportedState:
        """Rows `idx` of the stepped (per-hypothesis) fields; the encoder fields are right."""
        k = self.layout.stepped
        moved = [f.index_select(d, idx)
                 for f, d in zip(self.fields[:k], self.layout.row_dims[:k], strict=True)]
        return ExportedState(self.layout, [*moved, *self.fields[k:]])

    def stepped(self, new: Sequence[Tensor]) -> ExportedState:
        """This state with the stepped fields replaced by a step's outputs."""
        return ExportedState(self.layout, [*new, *self.fields[self.layout.stepped:]])


class ExportedModel:
    """The exported programs behind the step protocol of the shipped `model/search.py`."""

    def __init__(self, export_dir: Path, layout: StateLayout) -> None:
        self.layout = layout
        self.encoder = torch.export.load(export_dir / ENCODER_FILE).module().requires_grad_(False)
        self.decoder_step = torch.export.load(export_dir / STEP_FILE).module().requires_grad_(
            False)

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, ...]:
        """src (B, S), src_lengths (B,) -> the initial state's fields (encode + init_state)."""
        return tuple(self.encoder(src, src_lengths))

    def init_state(self, encoder_output: tuple[Tensor, ...]) -> ExportedState:
        return ExportedState(self.layout, encoder_output)

    def step(self, state: ExportedState, prev_tokens: Tensor
             ) -> tuple[Tensor, ExportedState, Tensor]:
        """prev_tokens (N,) -> log_probs (N, V), the new state, attention weights (N, S)."""
        log_probs, *new, weights = self.decoder_step(prev_tokens, *state.fields)
        return log_probs, state.stepped(new), weights


@dataclass(frozen=True)
class Result:
    """One sentence's `nbest` translations, best first (as `nmt.translator.Translation`)."""

    hypotheses: list[str]
    scores: list[float]
    tokens: list[list[int]]

    @property
    def text(self) -> str:
        return self.hypotheses[0]


class PortableTranslator:
    """Translate with the exported programs and the shipped search; mirrors `Translator`."""

    def __init__(self, export_dir: Path | str) -> None:
        folder = Path(export_dir)
        self.config = json.loads((folder / RUNNER_CONFIG).read_text(encoding="utf-8"))
        self.model = ExportedModel(folder, StateLayout.from_json(self.config["state"]))
        self._normalize = load_shipped(folder, "text").normalize
        self._search = load_shipped(folder, "model.search")
        self._pad_sources = load_shipped(folder, "data.padding").pad_sources
        self.src_tok, self.trg_tok = load_shipped(folder, "data.vocab").load_tokenizers(
            folder / "tokenizers")

    def search(self, src: Tensor, src_lengths: Tensor, beam_size: int, nbest: int = 1) -> object:
        """Greedy search for beam_size 1, else beam search (as `Translator` does)."""
        cfg, search = self.config, self._search
        if beam_size == 1:
            return search.greedy_search(self.model, src, src_lengths, cfg["max_len_ratio"],
                                        cfg["max_len_offset"])
        return search.beam_search(self.model, src, src_lengths, beam_size=beam_size,
                                  length_penalty=cfg["length_penalty"],
                                  max_len_ratio=cfg["max_len_ratio"],
                                  max_len_offset=cfg["max_len_offset"], nbest=nbest)

    def translate(self, sentences: Sequence[str], beam_size: int | None = None,
                  nbest: int | None = None, batch_size: int | None = None) -> list[Result]:
        """Per sentence, `nbest` translations with scores, best first; "" for empty input."""
        cfg = self.config
        beam = cfg["beam_size"] if beam_size is None else beam_size
        n = min(cfg["nbest"], beam) if nbest is None else nbest
        # as `SearchConfig.sentences_per_batch`: the configured beam's hypotheses per batch
        batch = (max(1, cfg["batch_size"] * cfg["beam_size"] // max(beam, 1))
                 if batch_size is None else batch_size)
        if beam < 1 or not 1 <= n <= beam or batch < 1:
            raise ValueError(f"need beam_size >= 1, 1 <= nbest <= beam_size, batch_size >= 1; "
                             f"got {beam}, {n}, {batch}")
        sources = [self._normalize(s) for s in sentences]
        out = [Result([""] * n, [0.0] * n, [[] for _ in range(n)]) for _ in sources]
        encoded = sorted(((self.src_tok.encode(s)[: cfg["max_src_tokens"]], i)
                          for i, s in enumerate(sources) if s), key=lambda e: (len(e[0]), e[1]))
        for start in range(0, len(encoded), batch):
            chunk = encoded[start:start + batch]
            src, src_lengths = self._pad_sources([ids for ids, _ in chunk])
            hyps = self.search(src, src_lengths, beam, n)
            for row, (_, index) in enumerate(chunk):
                tokens = [list(map(int, t)) for t in hyps.tokens[row]]
                out[index] = Result([self.trg_tok.decode(t) for t in tokens],
                                    [float(s) for s in hyps.scores[row].tolist()], tokens)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sentences", nargs="*", help="English sentences; none or '-': stdin")
    parser.add_argument("--export-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--beam", type=int, default=None, help="beam size (1 = greedy)")
    parser.add_argument("--nbest", type=int, default=None, help="hypotheses per sentence")
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args(argv)
    lines = args.sentences
    if not lines or lines == ["-"]:
        lines = [line.rstrip("\r\n") for line in sys.stdin]
    translator = PortableTranslator(args.export_dir)
    try:
        results = translator.translate(lines, args.beam, args.nbest, args.batch_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for i, result in enumerate(results):
        if len(result.hypotheses) == 1:
            print(result.text)
            continue
        for text, score in zip(result.hypotheses, result.scores, strict=True):
            print(f"{i}\t{score:.4f}\t{text}" if math.isfinite(score) else f"{i}\t-inf\t")
    return 0


if __name__ == "__main__":
    sys.exit(main())
