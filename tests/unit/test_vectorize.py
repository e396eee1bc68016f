"""Grouped deterministic split, tokenizer outputs, length filter, stats."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from conftest import tiny_raw
from nmt.config import parse_params
from nmt.data.vectorize import SPLITS, load_split, split_of, vectorize
from nmt.data.vocab import load_tokenizers


def test_split_of_is_stable_and_roughly_proportional() -> None:
    names = [split_of(f"sentence {i}", 7, 0.1, 0.2) for i in range(5000)]
    assert names == [split_of(f"sentence {i}", 7, 0.1, 0.2) for i in range(5000)]
    share = {s: names.count(s) / len(names) for s in SPLITS}
    assert share["test"] == pytest.approx(0.2, abs=0.03)
    assert share["valid"] == pytest.approx(0.1, abs=0.03)
    assert names != [split_of(f"sentence {i}", 8, 0.1, 0.2) for i in range(5000)]


def test_outputs_on_tiny_corpus(tiny_data: dict[str, Path]) -> None:
    processed = tiny_data["processed"]
    splits = {s: load_split(processed, s) for s in SPLITS}
    sources = [set(d.en) for d in splits.values()]
    assert not (sources[0] & sources[1]) and not (sources[0] & sources[2])
    assert not (sources[1] & sources[2])
    src_tok, trg_tok = load_tokenizers(processed / "tokenizers")
    test = splits["test"]
    assert len(test) > 50
    for i in range(10):
        assert src_tok.decode(test.src[i]) == test.en[i]
        assert trg_tok.decode(test.trg[i]).replace(" ", "") == test.fr[i].replace(" ", "")
    # group ids enumerate distinct sources
    assert len(set(test.group.tolist())) == len(set(test.en))
    srcs, refs = test.references()
    assert len(srcs) == len(refs) == len(set(test.en)) and sum(map(len, refs)) == len(test)


def test_length_filter_and_stats(tmp_path: Path, tiny_data: dict[str, Path]) -> None:
    cfg = dataclasses.replace(parse_params(tiny_raw()).vectorize, max_src_tokens=5,
                              tokenizer="char")
    stats = vectorize(tiny_data["pairs"], tmp_path / "out", tmp_path / "stats.json", cfg, seed=1)
    train = load_split(tmp_path / "out", "train")
    assert max(map(len, train.src)) <= 5
    assert stats["train"]["dropped_too_long"] > 0
    assert stats["train"]["pairs"] == len(train)
    assert stats["tokenizer"] == "char"
    total = sum(stats[s]["pairs"] for s in SPLITS) + stats["train"]["dropped_too_long"]
    assert total == stats["input_pairs"] - stats["duplicates_dropped"]
    assert (tmp_path / "stats.json").is_file()


def test_vectorize_is_byte_reproducible(tmp_path: Path, tiny_data: dict[str, Path]) -> None:
    cfg = parse_params(tiny_raw()).vectorize
    for name in ("a", "b"):
        vectorize(tiny_data["pairs"], tmp_path / name, tmp_path / f"{name}.json", cfg, seed=3)
    for rel in ("train.parquet", "test.parquet", "tokenizers/src.model", "tokenizers/trg.model"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    shuffled = pd.read_parquet(tiny_data["pairs"]).sample(frac=1.0, random_state=0)
    shuffled.to_parquet(tmp_path / "shuffled.parquet")
    vectorize(tmp_path / "shuffled.parquet", tmp_path / "c", tmp_path / "c.json", cfg, seed=3)
    assert set(load_split(tmp_path / "c", "test").en) == set(load_split(tmp_path / "a", "test").en)
