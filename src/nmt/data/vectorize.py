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
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SplitData:
    """One split in memory; row i of every field belongs to the same pair."""

    src: list[np.ndarray]  # int32 ids per row, no BOS/EOS
    trg: list[np.ndarray]
    en: list[str]
    fr: list[str]
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
    unique = pd.unique(pairs["en"])
    lookup = {s: split_of(s, seed, cfg.valid_fraction, cfg.test_fraction) for s in unique}
    return pairs["en"].map(lookup)


def train_tokenizers(train: pd.DataFrame, cfg: VectorizeConfig,
                     seed: int) -> tuple[Tokenizer, Tokenizer]:
    """Fit source and target tokenizers on the train split only."""
    if cfg.tokenizer == "char":
        return CharTokenizer.train(train["en"]), CharTokenizer.train(train["fr"])
    return tuple(  # type: ignore[return-value]
        SentencePieceTokenizer.train(list(train[side]), size, cfg.sp_model_type,
                                     cfg.character_coverage, seed)
        for side, size in (("en", cfg.src_vocab_size), ("fr", cfg.trg_vocab_size)))


def _encode(tok: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(tok.encode(t), dtype=np.int32) for t in texts]


def _lengths(seqs: list[np.ndarray]) -> np.ndarray:
    return np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))


def _length_stats(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {}
    pct = np.percentile(lengths, [50, 90, 95, 99])
    return {"mean": round(float(lengths.mean()), 2), "p50": float(pct[0]),
            "p90": float(pct[1]), "p95": float(pct[2]), "p99": float(pct[3]),
            "max": int(lengths.max())}


def _unk_rate(seqs: list[np.ndarray]) -> float:
    total = sum(len(s) for s in seqs)
    return float(sum(int((s == UNK_ID).sum()) for s in seqs) / total) if total else 0.0


def _write_split(path: Path, frame: pd.DataFrame, src: list[np.ndarray],
                 trg: list[np.ndarray]) -> None:
    table = pa.table({
        "en": pa.array(frame["en"].tolist(), pa.string()),
        "fr": pa.array(frame["fr"].tolist(), pa.string()),
        "group": pa.array(frame["group"].to_numpy(), pa.int64()),
        "line": pa.array(frame["line"].to_numpy(), pa.int64()),
        "src": pa.array(src, pa.list_(pa.int32())),
        "trg": pa.array(trg, pa.list_(pa.int32())),
    })
    pq.write_table(table, path, compression="zstd")


def _split_stats(frame: pd.DataFrame, src: list[np.ndarray], trg: list[np.ndarray],
                 dropped: int) -> dict[str, Any]:
    refs = frame.groupby("group").size()
    return {
        "pairs": len(frame), "sources": int(frame["group"].nunique()),
        "refs_per_source": {"mean": round(float(refs.mean()), 3) if len(refs) else 0.0,
                            "max": int(refs.max()) if len(refs) else 0},
        "dropped_too_long": dropped,
        "src_tokens": _length_stats(_lengths(src)), "trg_tokens": _length_stats(_lengths(trg)),
        "src_unk_rate": _unk_rate(src), "trg_unk_rate": _unk_rate(trg),
    }


def vectorize(pairs_path: Path, out_dir: Path, stats_path: Path, cfg: VectorizeConfig,
              seed: int) -> dict[str, Any]:
    """Split, fit tokenizers, encode, filter train by length; write `out_dir` and the stats."""
    pairs = pd.read_parquet(pairs_path)
    before = len(pairs)
    pairs = pairs.drop_duplicates(subset=["en", "fr"], keep="first").reset_index(drop=True)
    stats: dict[str, Any] = {"input_pairs": before, "duplicates_dropped": before - len(pairs)}
    pairs["split"] = assign_splits(pairs, cfg, seed)
    src_tok, trg_tok = train_tokenizers(pairs[pairs["split"] == "train"], cfg, seed)
    stats.update(tokenizer=cfg.tokenizer, src_vocab_size=src_tok.vocab_size,
                 trg_vocab_size=trg_tok.vocab_size)
    with atomic_dir(out_dir) as tmp:
        save_tokenizers(tmp / "tokenizers", src_tok, trg_tok)
        for split in SPLITS:
            frame = pairs[pairs["split"] == split].reset_index(drop=True)
            frame["group"] = pd.factorize(frame["en"])[0].astype("int64")
            src, trg = _encode(src_tok, frame["en"]), _encode(trg_tok, frame["fr"])
            dropped = 0
            if split == "train":
                keep = ((_lengths(src) <= cfg.max_src_tokens)
                        & (_lengths(trg) <= cfg.max_trg_tokens))
                dropped = int((~keep).sum())
                frame = frame[keep].reset_index(drop=True)
                src = [s for s, k in zip(src, keep, strict=True) if k]
                trg = [t for t, k in zip(trg, keep, strict=True) if k]
            _write_split(tmp / f"{split}.parquet", frame, src, trg)
            stats[split] = _split_stats(frame, src, trg, dropped)
            log.info("%s: %d pairs, %d sources, %d dropped as too long", split, len(frame),
                     stats[split]["sources"], dropped)
    write_json(stats_path, stats)
    return stats


def load_split(processed_dir: Path | str, split: str) -> SplitData:
    """Read one split written by `vectorize`."""
    path = Path(processed_dir) / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dvc repro vectorize` first")
    table = pq.read_table(path)

    def ragged(name: str) -> list[np.ndarray]:
        col = table.column(name).combine_chunks()
        flat = col.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        offsets = col.offsets.to_numpy()
        return np.split(flat, offsets[1:-1]) if len(col) else []

    return SplitData(src=ragged("src"), trg=ragged("trg"),
                     en=table.column("en").to_pylist(), fr=table.column("fr").to_pylist(),
                     group=table.column("group").to_numpy().astype(np.int64))
