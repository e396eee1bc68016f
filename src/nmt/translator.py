"""`Translator`: English text in, French text out, for the CLI, evaluation, export and serving.

Depends on torch and the model/tokenizer code only (no Lightning, no MLflow), so an exported
pyfunc or a REST handler can wrap it unchanged.

Per call to `translate`:
1. inputs that are not valid Unicode (`nmt.text.unicode_problem`) stop the call with an
   `InputError` naming them, before any decoding; valid ones are cleaned with
   `nmt.text.normalize`, as the corpus was before training, so training and serving see the same
   text;
2. empty sentences get an empty translation without running the model;
3. sources longer than the model's `vectorize.max_src_tokens` are cut to that length (one warning
   per call, `Translation.truncated`); pieces the tokenizer does not know become UNK
   (`Translation.unk_count`);
4. sentences are sorted by length, decoded in batches of `batch_size` (beam search, or greedy
   search when beam_size = 1) and returned in input order. Without a batch size the batch holds
   `search.batch_size x search.beam_size` hypotheses whatever the width asked for, so greedy
   search decodes 5x the sources per batch at the defaults (test split, bf16 on a Xeon with AMX:
   961-979 -> 1,334-1,366 sentences/s, a fresh process as in the evaluate stage). With a
   lexical shortlist (`nmt.shortlist`, `models/shortlist.npz`) each batch is searched over the
   target pieces its source pieces make likely instead of the whole vocabulary.

Precision (`evaluate.search.precision`, `nmt.decode_precision`): `bf16` decodes with a bf16
copy of the model, with the log-softmax and every search score in fp32; `fp32` decodes as
before. An int8 model (`to_int8`) decodes in int8 whatever the precision. `compile_step`
(serving's `--compile`) runs a Transformer's encoder and decoder step as compiled programs in the
current precision (`nmt.compiled_step`).

Size: about 330 lines, one class whose parts (loading, shortlist and precision modes, batching,
truncation and UNK accounting) all act on the same decoding call; the search itself lives in
`nmt.model.search`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from nmt.allocator import keep_freed_memory
from nmt.checkpoint import ModelDir
from nmt.compiled_step import CompiledTransformer
from nmt.config import SearchConfig, check_beam
from nmt.data.padding import pad_sources
from nmt.data.vocab import Tokenizer
from nmt.decode_precision import Fp32LogProbs, bf16_copy, resolve_decode_precision
from nmt.model import SearchResult, Seq2Seq, Transformer, beam_search, greedy_search
from nmt.model.quantize import is_quantized, quantize_int8
from nmt.shortlist import Shortlist, ShortlistModel, output_layer
from nmt.specials import SPECIAL_PIECES, UNK_ID
from nmt.text import normalize, unicode_problem

log = logging.getLogger(__name__)

EOS_LABEL = SPECIAL_PIECES[3]  # "</s>": the last row and column of every attention matrix


class InputError(ValueError):
    """Input cannot be read as text: a missing or non-UTF-8 file, or a string that is not valid
    Unicode (lone surrogates, what Python makes of undecodable bytes)."""


@dataclass(frozen=True)
class Translation:
    """The translation of one input sentence.

    source: the normalised input (what the model saw, before truncation).
    hypotheses, scores, tokens: `nbest` entries, best first; scores are the search's (sum of log
        probabilities, divided by the GNMT length penalty for beam search); tokens are target
        ids without BOS/EOS. An empty source gives `nbest` empty hypotheses with score 0.
    attention: weights of the best hypothesis, shape (T_out, S): one row per output token plus
        the final EOS, one column per source piece (after truncation) plus the source EOS;
        shape (0, 0) for an empty source.
    truncated: the source was cut to the model's maximum source length.
    unk_count: source pieces mapped to UNK.
    hit_max_len: the best output reached the search's length cap (likely cut off).
    """

    source: str
    hypotheses: list[str]
    scores: list[float]
    tokens: list[list[int]]
    attention: Tensor = field(repr=False, compare=False)
    truncated: bool = False
    unk_count: int = 0
    hit_max_len: bool = False

    @property
    def text(self) -> str:
        """The best hypothesis."""
        return self.hypotheses[0]


def read_lines(path: Path | str) -> list[str]:
    """Lines of a UTF-8 text file, line ends removed; empty lines kept (they translate to "").

    Raises:
        InputError: the file is missing, or not valid UTF-8 (naming the byte offset and line).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read input file ({exc.strerror or exc})") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path}: not valid UTF-8 at byte offset {exc.start} (line {line}: "
                         f"{data[exc.start:exc.start + 4]!r}); re-save the file as UTF-8"
                         ) from exc
    lines = [line.removesuffix("\r") for line in text.removeprefix("\ufeff").split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


def check_text(sentences: Sequence[str]) -> None:
    """Raise InputError naming every sentence (1-based, at most 10) that is not valid Unicode."""
    bad = [(i, p) for i, s in enumerate(sentences) if (p := unicode_problem(s)) is not None]
    if bad:
        shown = "; ".join(f"sentence {i + 1}: {p}" for i, p in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise InputError(f"{len(bad)} of {len(sentences)} inputs cannot be translated: "
                         f"{shown}{more}; pass UTF-8 text")


@dataclass(frozen=True)
class _Encoded:
    """One non-empty source ready for the model."""

    index: int  # position in the caller's list
    ids: list[int]  # truncated source ids, no EOS
    truncated: bool
    unk_count: int


class Translator:
    """Batched translation with a trained `Seq2Seq` and its tokenizers.

    Args:
        model: the model (put in eval mode; its device is used for decoding).
        src_tok, trg_tok: the tokenizers the model was trained with.
        search: default decoding settings (`evaluate.search` in params.yaml).
        max_src_tokens: sources are cut to this many tokens (`vectorize.max_src_tokens`).
        shortlist: search each batch over this lexical shortlist (None or a disabled one: the
            full vocabulary); it must fit the model's vocabularies.
        precision: decoding precision, auto | fp32 | bf16 (None: `search.precision`).
    """

    def __init__(self, model: Seq2Seq, src_tok: Tokenizer, trg_tok: Tokenizer,
                 search: SearchConfig, max_src_tokens: int,
                 shortlist: Shortlist | None = None, precision: str | None = None) -> None:
        if max_src_tokens < 1:
            raise ValueError(f"max_src_tokens: must be >= 1, got {max_src_tokens}")
        self.model = model.eval()
        keep_freed_memory("decode")
        self.src_tok, self.trg_tok = src_tok, trg_tok
        self.search = search
        self.max_src_tokens = max_src_tokens
        self.shortlist: Shortlist | None = None
        self._output: tuple[Tensor, Tensor | None] | None = None
        if shortlist is not None and shortlist.enabled:
            shortlist.check_fits(model.src_vocab_size, model.trg_vocab_size, "Translator")
            self.shortlist, self._output = shortlist, output_layer(model)
        self.precision = "fp32"  # resolved: fp32 | bf16
        self._bf16: tuple[Seq2Seq, tuple[Tensor, Tensor | None] | None] | None = None
        self._compiled: CompiledTransformer | None = None
        self.to_precision(search.precision if precision is None else precision)

    @classmethod
    def from_model_dir(cls, model_dir: Path | str, device: str | torch.device = "cpu",
                       int8: bool = False, shortlist: bool = True,
                       precision: str | None = None) -> Translator:
        """Load a model folder written by the train stage (search settings from its config).

        int8: decode with an int8 copy of the model (`nmt.model.quantize`; CPU only).
        shortlist: use the folder's `shortlist.npz` when it has one (False: full vocabulary).
        precision: auto | fp32 | bf16 (None: the config's `evaluate.search.precision`).
        """
        folder = ModelDir(Path(model_dir))
        if missing := folder.missing():
            raise FileNotFoundError(f"{folder.root}: not a model folder (missing "
                                    f"{', '.join(missing)}); run `dvc repro train` first or "
                                    "pass --model-dir")
        model, src_tok, trg_tok, params = folder.load(map_location=device)
        translator = cls(model, src_tok, trg_tok, params.evaluate.search,
                         params.vectorize.max_src_tokens,
                         Shortlist.load(folder.shortlist_file)
                         if shortlist and folder.has_shortlist() else None,
                         precision)
        return translator.to_int8() if int8 else translator

    def without_shortlist(self) -> Translator:
        """A translator over the same model that searches the full vocabulary."""
        other = copy.copy(self)
        other.shortlist, other._output = None, None
        return other

    def to_int8(self) -> Translator:
        """Switch this translator to an int8 copy of its model (CPU only); returns self."""
        if not is_quantized(self.model):
            self.model = quantize_int8(self.model)
        return self

    def to_precision(self, precision: str, key: str = "evaluate.search.precision") -> Translator:
        """Decode in `precision` (auto | fp32 | bf16, resolved for the model's device); returns
        self. ConfigError (named `key`) for an unknown value or bf16 where it would be emulated.
        """
        self.precision = resolve_decode_precision(precision, self.device, key)
        if self.precision == "bf16" and self._bf16 is None:  # model and shortlist output layer
            self._bf16 = (cast(Seq2Seq, bf16_copy(self.model)), None if self._output is None
                          else (self._output[0].bfloat16(), None if self._output[1] is None
                                else self._output[1].bfloat16()))
        return self

    def compile_step(self, cache_dir: Path | None = None) -> bool:
        """Decode with compiled encoder and decoder-step programs (`nmt.compiled_step`) in the
        current precision (fp32 or bf16) from now on.

        Returns False (decoding stays eager, with a warning logged) for a model that is not a
        Transformer or when the compiler fails. ValueError on an int8 translator.
        """
        if self.int8:
            raise ValueError("a compiled decoder step and int8 decoding exclude each other: "
                             "choose one")
        eager = None if self._bf16 is None or self.precision != "bf16" else self._bf16[0]
        self._compiled = CompiledTransformer.build(self.model, cache_dir, self.precision,
                                                   cast(Transformer | None, eager))
        return self._compiled is not None

    @property
    def compiled(self) -> bool:
        """True when decoding runs compiled programs (in the precision they were built for)."""
        return self._compiled is not None and self._compiled_precision() == self.precision

    def _compiled_precision(self) -> str:
        assert self._compiled is not None
        return "bf16" if self._compiled.dtype == torch.bfloat16 else "fp32"

    @property
    def int8(self) -> bool:
        """True when decoding runs on an int8 copy of the model."""
        return is_quantized(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def translate(self, sentences: Sequence[str], beam_size: int | None = None,
                  nbest: int | None = None, batch_size: int | None = None) -> list[Translation]:
        """Translate `sentences` (raw text); see the module docstring for the steps.

        `beam_size`, `nbest` and `batch_size` default to the `search` settings; nbest must not
        exceed beam_size. The default batch keeps the hypotheses per batch of the configured
        beam (`SearchConfig.sentences_per_batch`: greedy takes 640 sources where beam 5 takes
        128).
        """
        beam = self.search.beam_size if beam_size is None else beam_size
        n = self.search.nbest if nbest is None else nbest
        if nbest is None and beam_size is not None:
            n = min(n, beam)
        check_beam(beam, n, max_beam=None)  # the search works for any width
        batch = self.search.sentences_per_batch(beam) if batch_size is None else batch_size
        if batch < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch}")
        check_text(sentences)
        sources = [normalize(s) for s in sentences]
        encoded = [self._encode(i, s) for i, s in enumerate(sources) if s]
        self._warn_truncated(encoded, len(sources))
        out: list[Translation | None] = [None] * len(sources)
        for i, s in enumerate(sources):
            if not s:
                out[i] = Translation(s, [""] * n, [0.0] * n, [[] for _ in range(n)],
                                     torch.zeros(0, 0))
        encoded.sort(key=lambda e: (len(e.ids), e.index))
        for start in range(0, len(encoded), batch):
            chunk = encoded[start:start + batch]
            result = self._search([e.ids for e in chunk], beam, n)
            for row, enc in enumerate(chunk):
                out[enc.index] = self._translation(sources[enc.index], enc, result, row)
        return out  # type: ignore[return-value]  # every slot is filled above

    def source_pieces(self, sentence: str) -> list[str]:
        """Column labels of `Translation.attention`: source pieces after truncation, then EOS."""
        check_text([sentence])
        return [*self.src_tok.pieces(normalize(sentence))[: self.max_src_tokens], EOS_LABEL]

    def target_pieces(self, tokens: Sequence[int]) -> list[str]:
        """Row labels of `Translation.attention`: each output token's text, then EOS."""
        return [*(self.trg_tok.decode([int(t)]) or "\u00b7" for t in tokens), EOS_LABEL]

    # ------------------------------------------------------------------------------ helpers
    def _encode(self, index: int, source: str) -> _Encoded:
        ids = self.src_tok.encode(source)
        kept = ids[: self.max_src_tokens]
        return _Encoded(index, kept, len(ids) > len(kept), sum(i == UNK_ID for i in kept))

    def _warn_truncated(self, encoded: list[_Encoded], total: int) -> None:
        cut = [e.index for e in encoded if e.truncated]
        if cut:
            shown = ", ".join(str(i + 1) for i in cut[:10]) + (", ..." if len(cut) > 10 else "")
            log.warning("%d of %d sentences are longer than %d source tokens and were truncated "
                        "(sentence %s)", len(cut), total, self.max_src_tokens, shown)

    def _search(self, ids: list[list[int]], beam: int, nbest: int) -> SearchResult:
        src, src_lengths = pad_sources(ids)  # (B, S) ids + EOS then PAD, (B,)
        src, src_lengths = src.to(self.device), src_lengths.to(self.device)
        model, output = self.model, self._output
        bf16 = self._bf16 is not None and self.precision == "bf16" and not self.int8
        if bf16:
            model, output = self._bf16  # type: ignore[misc]  # bf16 is only True when set
        if self.compiled and not self.int8:
            model = cast(Seq2Seq, self._compiled)
        shortlisted = None
        if self.shortlist is not None and output is not None:
            ids, allowed = self.shortlist.batch(src)
            shortlisted = ShortlistModel(model, ids.to(self.device), *output, allowed)
        step_model = cast(Seq2Seq, model if shortlisted is None else shortlisted)
        if bf16:
            step_model = cast(Seq2Seq, Fp32LogProbs(step_model))
        result = self._run_search(step_model, src, src_lengths, beam, nbest)
        return result if shortlisted is None else shortlisted.to_vocabulary(result)

    def _run_search(self, model: Seq2Seq, src: Tensor, src_lengths: Tensor, beam: int,
                    nbest: int) -> SearchResult:
        s = self.search
        if beam == 1:
            result = greedy_search(model, src, src_lengths, s.max_len_ratio, s.max_len_offset)
        else:
            result = beam_search(model, src, src_lengths, beam_size=beam,
                                 length_penalty=s.length_penalty, max_len_ratio=s.max_len_ratio,
                                 max_len_offset=s.max_len_offset, nbest=nbest)
        return result

    def _translation(self, source: str, enc: _Encoded, result: SearchResult,
                     row: int) -> Translation:
        tokens = [list(map(int, t)) for t in result.tokens[row]]
        return Translation(
            source=source, hypotheses=[self.trg_tok.decode(t) for t in tokens],
            scores=[float(x) for x in result.scores[row].tolist()], tokens=tokens,
            attention=result.attention[row].detach().float().cpu(), truncated=enc.truncated,
            unk_count=enc.unk_count, hit_max_len=bool(result.hit_max_len[row]))
