"""Config loading: strict keys and types, dotted-key errors, profiles, cross-field rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_PROFILE
from nmt.config import (
    ConfigError,
    SearchConfig,
    beam_problem,
    check_beam,
    flatten,
    load_params,
    merge,
    parse_params,
    read_yaml,
)


def _raw() -> dict:
    return read_yaml(REPO / "params.yaml")


def test_default_params_load_and_are_frozen() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.vectorize.tokenizer == "sentencepiece"
    assert params.evaluate.search.beam_size >= 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0  # type: ignore[misc]


def test_tiny_profile_overrides_only_named_keys() -> None:
    base = load_params(REPO / "params.yaml")
    tiny = load_params(REPO / "params.yaml", TINY_PROFILE)
    assert tiny.model.hidden < base.model.hidden
    assert tiny.model.rnn == base.model.rnn
    assert tiny.download.sha256 != base.download.sha256


@pytest.mark.parametrize(("mutate", "key", "words"), [
    (lambda r: r["train"].pop("lr"), "train.lr", "missing"),
    (lambda r: r["model"].update(hiden=8), "model.hiden", "unknown key"),
    (lambda r: r["model"].update(hidden="big"), "model.hidden", "expected int"),
    (lambda r: r["train"].update(lr="1e-3"), "train.lr", "1.0e-3"),
    (lambda r: r["model"].update(bidirectional=1), "model.bidirectional", "expected bool"),
    (lambda r: r["model"].update(hidden=True), "model.hidden", "got bool"),
    (lambda r: r["model"].update(attention="luong"), "model.attention", "'bahdanau'"),
    (lambda r: r["evaluate"]["search"].update(beam_size=0), "evaluate.search.beam_size",
     "must be in [1, 64], got 0"),
    (lambda r: r["evaluate"]["search"].update(beam_size=150), "evaluate.search.beam_size",
     "must be in [1, 64], got 150"),
    (lambda r: r["evaluate"]["search"].update(beam_size=4, nbest=5), "evaluate.search.nbest",
     "must be in [1, beam_size=4], got 5"),
    (lambda r: r["evaluate"].update(search=5), "evaluate.search", "expected a mapping"),
    (lambda r: r["vectorize"].update(valid_fraction=0.3, test_fraction=0.3),
     "vectorize.test_fraction", "< 0.5"),
    (lambda r: r["model"].update(attention="none", input_feeding=True), "model.input_feeding",
     "attention"),
    (lambda r: r["download"].update(sha256="abc"), "download.sha256", "64 hex"),
    (lambda r: r["evaluate"].update(length_buckets=[10, 5]), "evaluate.length_buckets",
     "increasing"),
    (lambda r: r["evaluate"].update(length_buckets=[5, "x"]), "evaluate.length_buckets[1]",
     "expected int"),
])
def test_bad_values_name_the_dotted_key(mutate, key: str, words: str) -> None:
    raw = _raw()
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert info.value.key == key
    assert words in str(info.value)
    assert "params.yaml" in str(info.value)


def test_int_is_accepted_for_float() -> None:
    raw = _raw()
    raw["train"]["lr"] = 1
    assert parse_params(raw).train.lr == 1.0


def test_profile_with_unknown_key_is_rejected(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"train": {"learning_rate": 0.1}}))
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_params(REPO / "params.yaml", profile)


def test_missing_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_merge_is_deep_and_does_not_mutate() -> None:
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    out = merge(base, {"a": {"b": 5}})
    assert out == {"a": {"b": 5, "c": 2}, "d": 3}
    assert base["a"]["b"] == 1


def test_flatten_gives_dotted_leaves() -> None:
    flat = dict(flatten(load_params(REPO / "params.yaml")))
    assert flat["evaluate.search.beam_size"] == 5 or isinstance(
        flat["evaluate.search.beam_size"], int)
    assert "train.lr" in flat and "seed" in flat
    assert not any(dataclasses.is_dataclass(v) for v in flat.values())


def test_one_beam_rule_for_every_caller() -> None:
    assert beam_problem(64, 64) is None and beam_problem(1, 1) is None
    assert beam_problem(65, 1) == ("beam_size", "must be in [1, 64], got 65")
    assert beam_problem(500, 3, max_beam=None) is None  # the search itself has no upper bound
    assert beam_problem(0, 1, max_beam=None) == ("beam_size", "must be >= 1, got 0")
    assert beam_problem(3, 0) == ("nbest", "must be in [1, beam_size=3], got 0")
    with pytest.raises(ValueError, match=r"^--nbest: must be in \[1, beam_size=2\], got 3$"):
        check_beam(2, 3, beam_key="--beam", nbest_key="--nbest")


def test_default_batch_keeps_the_hypotheses_of_the_configured_beam() -> None:
    search = SearchConfig(beam_size=5, length_penalty=0.6, max_len_ratio=1.5, max_len_offset=10,
                          nbest=1, batch_size=128)
    assert search.sentences_per_batch(5) == 128
    assert search.sentences_per_batch(1) == 640  # greedy: the same 640 rows
    assert search.sentences_per_batch(10) == 64
    assert search.sentences_per_batch(64) == 10
    tiny = dataclasses.replace(search, batch_size=1)
    assert tiny.sentences_per_batch(64) == 1  # never below one sentence
