"""Tokenizers: SentencePiece (unigram or BPE) and characters, with fixed special ids.

Both kinds map text to ids and back, with PAD/UNK/BOS/EOS at the ids in `nmt.specials`, and are
saved as plain files in one folder that later stages and the exported model load:

    tokenizers/meta.json           {"kind": "sentencepiece" | "char", ...}
    tokenizers/src.model, trg.model      (sentencepiece) or
    tokenizers/src.chars.json, trg.chars.json  (char: the ordered vocabulary)
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, Protocol

# relative: shipped with the portable export, outside the `nmt` package (nmt.export.programs)
from ..io import atomic_path, write_json
from ..specials import BOS_ID, EOS_ID, PAD_ID, SPECIAL_PIECES, UNK_ID

Side = Literal["src", "trg"]


class Tokenizer(Protocol):
    """What the rest of the project needs from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included."""
        ...

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without BOS/EOS."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids are skipped."""
        ...

    def pieces(self, text: str) -> list[str]:
        """Surface pieces of `text` (for attention heatmap labels)."""
        ...

    def save(self, folder: Path, side: Side) -> None:
        """Write this tokenizer's file(s) into `folder`."""
        ...


class CharTokenizer:
    """Character-level vocabulary, as in the Keras lstm_seq2seq tutorial (plus UNK)."""

    kind = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)
        self._index = {c: i + len(SPECIAL_PIECES) for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        """Vocabulary of every character seen, in code-point order."""
        return cls(sorted(set().union(*map(set, texts))))

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included."""
        return len(SPECIAL_PIECES) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        """One id per character; unknown characters map to UNK."""
        return [self._index.get(c, UNK_ID) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Characters of `ids`, skipping specials; UNK shows as U+FFFD."""
        n = len(SPECIAL_PIECES)
        return "".join(self.chars[i - n] if i >= n else "\ufffd" if i == UNK_ID else ""
                       for i in ids if 0 <= i < self.vocab_size)

    def pieces(self, text: str) -> list[str]:
        """Characters of `text`."""
        return list(text)

    def save(self, folder: Path, side: Side) -> None:
        """Write `<side>.chars.json`."""
        write_json(folder / f"{side}.chars.json", self.chars)

    @classmethod
    def load(cls, folder: Path, side: Side) -> CharTokenizer:
        """Read `<side>.chars.json`."""
        return cls(json.loads((folder / f"{side}.chars.json").read_text(encoding="utf-8")))


class SentencePieceTokenizer:
    """SentencePiece model trained with this project's special ids."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece as spm

        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        assert (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()) == (
            PAD_ID, UNK_ID, BOS_ID, EOS_ID), "sentencepiece model has unexpected special ids"

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, model_type: str,
              character_coverage: float, seed: int) -> SentencePieceTokenizer:
        """Train on `texts` in one thread (so the model is reproducible byte for byte)."""
        import sentencepiece as spm

        spm.set_random_generator_seed(seed)
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buffer, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece=SPECIAL_PIECES[PAD_ID], unk_piece=SPECIAL_PIECES[UNK_ID],
            bos_piece=SPECIAL_PIECES[BOS_ID], eos_piece=SPECIAL_PIECES[EOS_ID],
            hard_vocab_limit=False, num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, minloglevel=2,
        )
        return cls(buffer.getvalue())

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included."""
        return int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        """Piece ids of `text`."""
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        """Detokenised text; special ids are dropped."""
        return str(self._sp.decode([int(i) for i in ids if i > EOS_ID or i == UNK_ID]))

    def pieces(self, text: str) -> list[str]:
        """Surface pieces of `text`."""
        return list(self._sp.encode(text, out_type=str))

    def save(self, folder: Path, side: Side) -> None:
        """Write `<side>.model`."""
        with atomic_path(folder / f"{side}.model") as tmp:
            tmp.write_bytes(self.model_proto)

    @classmethod
    def load(cls, folder: Path, side: Side) -> SentencePieceTokenizer:
        """Read `<side>.model`."""
        return cls((folder / f"{side}.model").read_bytes())


_KINDS = {"char": CharTokenizer, "sentencepiece": SentencePieceTokenizer}


def save_tokenizers(folder: Path, src: Tokenizer, trg: Tokenizer) -> None:
    """Write both tokenizers and `meta.json` into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    src.save(folder, "src")
    trg.save(folder, "trg")
    write_json(folder / "meta.json", {
        "kind": src.kind, "src_vocab_size": src.vocab_size, "trg_vocab_size": trg.vocab_size,
        "specials": dict(zip(SPECIAL_PIECES, (PAD_ID, UNK_ID, BOS_ID, EOS_ID), strict=True)),
    })


def load_tokenizers(folder: Path | str) -> tuple[Tokenizer, Tokenizer]:
    """Load `(src, trg)` tokenizers saved by `save_tokenizers`."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: run the vectorize stage "
                                "(`dvc repro vectorize`) or point at a model folder")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    cls = _KINDS[meta["kind"]]
    return cls.load(folder, "src"), cls.load(folder, "trg")  # type: ignore[attr-defined]
