"""The vectorize stage: pairs table -> grouped splits, tokenizers and token ids.

Split: every distinct (normalised) English sentence is assigned to train/valid/test by a sha1 hash
of the seed and the sentence, so all French translations of a source land in one split (no test
leakage; every reference is available for multi-reference BLEU) and row order does not matter.

Output folder:
    tokenizers/                    see `nmt.data.vocab`
    {train,valid,test}.parquet     en, fr, group, line, src (list<int32>), trg (list<int32>)
Ids carry no BOS/EOS. Rows sharing `group` share one English source.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from nmt.config import VectorizeConfig
from nmt.data.vocab import CharTokenizer, SentencePieceTokenizer, Tokenizer, save_tokenizers
from nmt.io import atomic_dir, write_json
from nmt.specials import UNK_ID

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
TOKENIZERS_DIR = "tokenizers"  # in the out folder; see `nmt.data.vocab`
ENCODE_ROWS = 100_000  # texts encoded per call (bounds the Python lists alive at once)
ITER_ROWS = 10_000  # rows turned into Python strings at a time when iterating `Texts`


class Ragged(Sequence[np.ndarray]):
    """Variable-length int32 rows stored flat: row i is `values[offsets[i]:offsets[i + 1]]`.

    Two numpy arrays instead of one array object per row, so a split of millions of pairs costs
    4 bytes per token plus 8 per row; indexing returns a view.
    """

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values = np.asarray(values, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)

    @classmethod
    def from_lengths(cls, values: np.ndarray, lengths: np.ndarray) -> Ragged:
        """Rows of `lengths` tokens each, consecutive in `values`."""
        return cls(values, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.values[a:b] for a, b in zip(self.offsets[:-1].tolist(),
                                                 self.offsets[1:].tolist(), strict=True))

    def lengths(self) -> np.ndarray:
        """Tokens per row, int64."""
        return np.diff(self.offsets)

    def select(self, keep: np.ndarray) -> Ragged:
        """The rows where the boolean mask `keep` is True, in order."""
        return Ragged.from_lengths(self.values[np.repeat(keep, self.lengths())],
                                   self.lengths()[keep])

    def to_arrow(self) -> pa.ListArray:
        """As an Arrow list<int32> array (no copy of the values)."""
        return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32)),
                                        pa.array(self.values, pa.int32()))

    @classmethod
    def from_arrow(cls, column: pa.ChunkedArray) -> Ragged:
        """From an Arrow list<int32> column (e.g. read from Parquet)."""
        col = column.combine_chunks()
        if len(col) == 0:
            return cls(np.zeros(0, np.int32), np.zeros(1, np.int64))
        offsets = col.offsets.to_numpy().astype(np.int64)
        values = col.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        return cls(values[offsets[0] : offsets[-1]], offsets - offsets[0])


class Texts(Sequence[str]):
    """Strings kept in an Arrow array; a Python str is made only for the row asked for."""

    def __init__(self, column: pa.ChunkedArray | pa.Array) -> None:
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return self.column[i].as_py()

    def __iter__(self) -> Iterator[str]:
        chunks = self.column.chunks if isinstance(self.column, pa.ChunkedArray) else [self.column]
        for chunk in chunks:
            for start in range(0, len(chunk), ITER_ROWS):
                yield from chunk.slice(start, ITER_ROWS).to_pylist()


@dataclass(frozen=True)
class SplitData:
    """One split in memory; row i of every field belongs to the same pair."""

    src: Sequence[np.ndarray]  # int32 ids per row, no BOS/EOS (`Ragged` when loaded)
    trg: Sequence[np.ndarray]
    en: Sequence[str]
    fr: Sequence[str]
    group: np.ndarray  # int64; equal values share one English source

    def __len__(self) -> int:
        return len(self.src)

    def references(self) -> tuple[list[str], list[list[str]]]:
        """Distinct sources (first-seen order) and all references of each."""
        sources: dict[int, str] = {}
        refs: dict[int, list[str]] = {}
        for g, en, fr in zip(self.group.tolist(), self.en, self.fr, strict=True):
            sources.setdefault(g, en)
            refs.setdefault(g, []).append(fr)
        return list(sources.values()), list(refs.values())


def split_of(sentence: str, seed: int, valid_fraction: float, test_fraction: float) -> str:
    """Deterministic split of one English sentence from a sha1 hash (never Python's hash())."""
    digest = hashlib.sha1(f"{seed}\x00{sentence}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "valid" if u < test_fraction + valid_fraction else "train"


def assign_splits(pairs: pd.DataFrame, cfg: VectorizeConfig, seed: int) -> pd.Series:
    """Split name per row, grouped by the English sentence."""
    codes, unique = pd.factorize(pairs["en"])
    names = np.array([split_of(s, seed, cfg.valid_fraction, cfg.test_fraction)
                      for s in Texts(pa.array(unique))], dtype=object)
    return pd.Series(names[codes], index=pairs.index, dtype=object)


def train_tokenizers(train: pd.DataFrame, cfg: VectorizeConfig,
                     seed: int) -> tuple[Tokenizer, Tokenizer]:
    """Fit source and target tokenizers on the train split only (SentencePiece: on a bounded
    sample of it, see `nmt.data.vocab.SP_SAMPLE_SENTENCES`)."""
    if cfg.tokenizer == "char":
        return CharTokenizer.train(train["en"]), CharTokenizer.train(train["fr"])
    return tuple(  # type: ignore[return-value]
        SentencePieceTokenizer.train(Texts(pa.array(train[side], pa.string())), size,
                                     cfg.sp_model_type, cfg.character_coverage, seed)
        for side, size in (("en", cfg.src_vocab_size), ("fr", cfg.trg_vocab_size)))


def _encode(tok: Tokenizer, texts: pd.Series) -> Ragged:
    """Ids of every text, encoded `ENCODE_ROWS` at a time into one flat array."""
    values, lengths = [], []
    for start in range(0, len(texts), ENCODE_ROWS):
        ids = tok.encode_batch(Texts(pa.array(texts.iloc[start : start + ENCODE_ROWS],
                                              pa.string())))
        lengths.append(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
        values.append(np.fromiter(chain.from_iterable(ids), dtype=np.int32,
                                  count=int(lengths[-1].sum())))
    if not values:
        return Ragged(np.zeros(0, np.int32), np.zeros(1, np.int64))
    return Ragged.from_lengths(np.concatenate(values), np.concatenate(lengths))


def _length_stats(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {}
    pct = np.percentile(lengths, [50, 90, 95, 99])
    return {"mean": round(float(lengths.mean()), 2), "p50": float(pct[0]),
            "p90": float(pct[1]), "p95": float(pct[2]), "p99": float(pct[3]),
            "max": int(lengths.max())}


def _unk_rate(seqs: Ragged) -> float:
    total = len(seqs.values)
    return float(int((seqs.values == UNK_ID).sum()) / total) if total else 0.0


def _write_split(path: Path, frame: pd.DataFrame, src: Ragged, trg: Ragged) -> None:
    """One Parquet file; row groups of at most `pyarrow`'s default 1 Mi rows."""
    if max(len(src.values), len(trg.values)) >= 2**31:
        raise ValueError(f"{path.name}: more than 2**31 tokens in one split; list<int32> "
                         "offsets cannot hold them (split the corpus into shards)")
    table = pa.table({
        "en": pa.array(frame["en"], pa.string()),
        "fr": pa.array(frame["fr"], pa.string()),
        "group": pa.array(frame["group"].to_numpy(), pa.int64()),
        "line": pa.array(frame["line"].to_numpy(), pa.int64()),
        "src": src.to_arrow(),
        "trg": trg.to_arrow(),
    })
    pq.write_table(table, path, compression="zstd")


def _split_stats(frame: pd.DataFrame, src: Ragged, trg: Ragged, dropped: int) -> dict[str, Any]:
    refs = frame.groupby("group").size()
    return {
        "pairs": len(frame), "sources": int(frame["group"].nunique()),
        "refs_per_source": {"mean": round(float(refs.mean()), 3) if len(refs) else 0.0,
                            "max": int(refs.max()) if len(refs) else 0},
        "dropped_too_long": dropped,
        "src_tokens": _length_stats(src.lengths()), "trg_tokens": _length_stats(trg.lengths()),
        "src_unk_rate": _unk_rate(src), "trg_unk_rate": _unk_rate(trg),
    }


def vectorize(pairs_path: Path, out_dir: Path, stats_path: Path, cfg: VectorizeConfig,
              seed: int) -> dict[str, Any]:
    """Split, fit tokenizers, encode, filter train by length; write `out_dir` and the stats.

    Text stays in Arrow-backed columns and ids in flat arrays (`Ragged`), so memory grows by
    about the size of the Parquet data, not by Python objects per row.
    """
    pairs = pd.read_parquet(pairs_path)
    before = len(pairs)
    pairs = pairs.drop_duplicates(subset=["en", "fr"], keep="first").reset_index(drop=True)
    stats: dict[str, Any] = {"input_pairs": before, "duplicates_dropped": before - len(pairs)}
    pairs["split"] = assign_splits(pairs, cfg, seed)
    src_tok, trg_tok = train_tokenizers(pairs[pairs["split"] == "train"], cfg, seed)
    stats.update(tokenizer=cfg.tokenizer, src_vocab_size=src_tok.vocab_size,
                 trg_vocab_size=trg_tok.vocab_size)
    with atomic_dir(out_dir) as tmp:
        save_tokenizers(tmp / TOKENIZERS_DIR, src_tok, trg_tok)
        for split in SPLITS:
            frame = pairs[pairs["split"] == split].reset_index(drop=True)
            frame["group"] = pd.factorize(frame["en"])[0].astype("int64")
            src, trg = _encode(src_tok, frame["en"]), _encode(trg_tok, frame["fr"])
            dropped = 0
            if split == "train":
                keep = ((src.lengths() <= cfg.max_src_tokens)
                        & (trg.lengths() <= cfg.max_trg_tokens))
                dropped = int((~keep).sum())
                frame = frame[keep].reset_index(drop=True)
                src, trg = src.select(keep), trg.select(keep)
            _write_split(tmp / f"{split}.parquet", frame, src, trg)
            stats[split] = _split_stats(frame, src, trg, dropped)
            log.info("%s: %d pairs, %d sources, %d dropped as too long", split, len(frame),
                     stats[split]["sources"], dropped)
    write_json(stats_path, stats)
    return stats


def tokenizers_dir(processed_dir: Path | str) -> Path:
    """The tokenizers folder that `vectorize` wrote into `processed_dir`."""
    return Path(processed_dir) / TOKENIZERS_DIR


def load_split(processed_dir: Path | str, split: str) -> SplitData:
    """Read one split written by `vectorize`: ids as `Ragged`, text as Arrow-backed `Texts`."""
    path = Path(processed_dir) / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dvc repro vectorize` first")
    table = pq.read_table(path)
    return SplitData(src=Ragged.from_arrow(table.column("src")),
                     trg=Ragged.from_arrow(table.column("trg")),
                     en=Texts(table.column("en")), fr=Texts(table.column("fr")),
                     group=table.column("group").to_numpy().astype(np.int64))
