"""Typed, immutable view of `params.yaml`.

Only this module reads the params file. Every section is a frozen dataclass with no defaults, so
every value lives in `params.yaml` (each with a comment there). An unknown, missing or wrongly
typed key raises `ConfigError` naming the dotted key; cross-field rules sit in `__post_init__`.

A *profile* is a small YAML file of overrides (same nesting) merged over the base params, e.g.
`tests/fixtures/params_tiny.yaml`, which shrinks the whole pipeline to seconds.

Size: one module past the ~300-line guideline on purpose: it is the only reader of
`params.yaml`, and the sections' dataclasses are that file's schema, read side by side with it;
the generic checking (`_build`, `merge`, `flatten`) is under 100 lines.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from nmt.beam_rule import MAX_BEAM_SIZE, beam_problem

T = TypeVar("T")


class ConfigError(ValueError):
    """A params value is unknown, missing, mistyped or out of range."""

    def __init__(self, key: str, message: str) -> None:
        self.key, self.reason = key, message
        super().__init__(f"{key}: {message} (edit params.yaml)")


DECODE_PRECISIONS = ("auto", "fp32", "bf16")  # evaluate.search.precision (`nmt.precision`)


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def check_beam(beam_size: int, nbest: int, max_beam: int | None = MAX_BEAM_SIZE,
               beam_key: str = "beam_size", nbest_key: str = "nbest") -> None:
    """Raise ValueError "<key>: <problem>" when `beam_problem` finds one."""
    if problem := beam_problem(beam_size, nbest, max_beam):
        key = beam_key if problem[0] == "beam_size" else nbest_key
        raise ValueError(f"{key}: {problem[1]}")


@dataclass(frozen=True)
class DownloadConfig:
    url: str
    sha256: str
    bundled: str
    connect_timeout_s: float
    read_timeout_s: float
    retries: int
    backoff_s: float
    max_download_bytes: int
    max_uncompressed_bytes: int
    max_compression_ratio: float
    corpus_member: str

    def __post_init__(self) -> None:
        p = "download"
        _require(self.url.startswith(("http://", "https://")), f"{p}.url", "must be http(s)")
        _require(
            self.sha256 == "" or (len(self.sha256) == 64 and _is_hex(self.sha256)),
            f"{p}.sha256",
            f"must be 64 hex digits or empty, got {self.sha256!r}",
        )
        _require(self.connect_timeout_s > 0, f"{p}.connect_timeout_s", "must be > 0")
        _require(self.read_timeout_s > 0, f"{p}.read_timeout_s", "must be > 0")
        _require(self.retries >= 0, f"{p}.retries", "must be >= 0")
        _require(self.backoff_s >= 0, f"{p}.backoff_s", "must be >= 0")
        _require(self.max_download_bytes > 0, f"{p}.max_download_bytes", "must be > 0")
        _require(self.max_uncompressed_bytes > 0, f"{p}.max_uncompressed_bytes", "must be > 0")
        _require(self.max_compression_ratio > 1, f"{p}.max_compression_ratio", "must be > 1")
        _require(bool(self.corpus_member), f"{p}.corpus_member", "must not be empty")


@dataclass(frozen=True)
class ValidateConfig:
    max_rejected_share: float
    min_rows: int
    max_rows: int
    max_chars: int
    min_length_ratio: float
    max_length_ratio: float
    length_ratio_mostly: float
    allowed_chars_mostly: float
    max_duplicate_share: float

    def __post_init__(self) -> None:
        p = "validate"
        for name in ("max_rejected_share", "length_ratio_mostly", "allowed_chars_mostly",
                     "max_duplicate_share"):
            v = getattr(self, name)
            _require(0.0 <= v <= 1.0, f"{p}.{name}", f"must be in [0, 1], got {v}")
        _require(self.min_rows >= 1, f"{p}.min_rows", "must be >= 1")
        _require(self.max_rows >= self.min_rows, f"{p}.max_rows", "must be >= validate.min_rows")
        _require(self.max_chars >= 1, f"{p}.max_chars", "must be >= 1")
        _require(0 < self.min_length_ratio < self.max_length_ratio, f"{p}.min_length_ratio",
                 "must satisfy 0 < min_length_ratio < max_length_ratio")


@dataclass(frozen=True)
class VectorizeConfig:
    valid_fraction: float
    test_fraction: float
    tokenizer: Literal["sentencepiece", "char"]
    sp_model_type: Literal["unigram", "bpe"]
    src_vocab_size: int
    trg_vocab_size: int
    character_coverage: float
    max_src_tokens: int
    max_trg_tokens: int

    def __post_init__(self) -> None:
        p = "vectorize"
        _require(0 < self.valid_fraction < 0.5, f"{p}.valid_fraction", "must be in (0, 0.5)")
        _require(0 < self.test_fraction < 0.5, f"{p}.test_fraction", "must be in (0, 0.5)")
        _require(self.valid_fraction + self.test_fraction < 0.5, f"{p}.test_fraction",
                 "valid_fraction + test_fraction must be < 0.5")
        _require(self.src_vocab_size >= 16, f"{p}.src_vocab_size", "must be >= 16")
        _require(self.trg_vocab_size >= 16, f"{p}.trg_vocab_size", "must be >= 16")
        _require(0.9 <= self.character_coverage <= 1.0, f"{p}.character_coverage",
                 "must be in [0.9, 1.0]")
        _require(self.max_src_tokens >= 1, f"{p}.max_src_tokens", "must be >= 1")
        _require(self.max_trg_tokens >= 1, f"{p}.max_trg_tokens", "must be >= 1")


@dataclass(frozen=True)
class TransformerConfig:
    """`model.transformer`: the Transformer encoder-decoder (used when `model.arch` is it)."""

    layers: int
    heads: int
    d_model: int
    ff_dim: int
    dropout: float
    positions: Literal["sinusoidal", "learned"]
    max_positions: int
    # defaults: model folders written before these keys load with 0 (dropout is off there)
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0

    def __post_init__(self) -> None:
        p = "model.transformer"
        for name in ("layers", "heads", "d_model", "ff_dim", "max_positions"):
            _require(getattr(self, name) >= 1, f"{p}.{name}",
                     f"must be >= 1, got {getattr(self, name)}")
        _require(self.d_model % self.heads == 0, f"{p}.d_model",
                 f"must be a multiple of {p}.heads={self.heads}, got {self.d_model}")
        _require(self.positions != "sinusoidal" or self.d_model % 2 == 0, f"{p}.d_model",
                 f"must be even for sinusoidal positions, got {self.d_model}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, f"{p}.{name}",
                     f"must be in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelConfig:
    """`model`: `arch` picks the RNN (the keys rnn .. dropout) or `transformer`.

    `tie_embeddings` applies to both. `transformer` may be given as a plain dict (a config
    read back from a checkpoint's `asdict`); it is built and checked like the params file.
    """

    arch: Literal["rnn", "transformer"]
    rnn: Literal["lstm", "gru"]
    emb_dim: int
    hidden: int
    enc_layers: int
    dec_layers: int
    bidirectional: bool
    attention: Literal["bahdanau", "luong_dot", "luong_general", "none"]
    input_feeding: bool
    dropout: float
    tie_embeddings: bool
    transformer: TransformerConfig

    def __post_init__(self) -> None:
        p = "model"
        if isinstance(self.transformer, dict):  # from asdict(): checkpoints, pyfunc config
            object.__setattr__(self, "transformer",
                               _build(TransformerConfig, self.transformer, f"{p}.transformer"))
        for name in ("emb_dim", "hidden", "enc_layers", "dec_layers"):
            _require(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1")
        _require(0.0 <= self.dropout < 1.0, f"{p}.dropout", "must be in [0, 1)")
        _require(not (self.input_feeding and self.attention == "none"), f"{p}.input_feeding",
                 "needs an attention other than 'none'")


@dataclass(frozen=True)
class TrainConfig:
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"]
    devices: int
    num_nodes: int
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"]
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "auto"]
    num_threads: int
    optimizer: Literal["adam", "adamw"]
    lr: float
    weight_decay: float
    lr_schedule: Literal["inverse_sqrt", "cosine", "plateau", "constant"]
    warmup_steps: int
    label_smoothing: float
    grad_clip: float
    batch_tokens: int
    max_batch_sentences: int
    num_workers: int
    max_epochs: int
    max_steps: int
    max_minutes: float
    limit_train_batches: float
    val_every_steps: int
    val_bleu_sentences: int
    val_samples: int
    early_stopping_patience: int
    log_every_steps: int

    def __post_init__(self) -> None:
        p = "train"
        _require(self.devices >= 1, f"{p}.devices", "must be >= 1")
        _require(self.num_nodes >= 1, f"{p}.num_nodes", "must be >= 1")
        _require(self.num_threads >= 0, f"{p}.num_threads", "must be >= 0 (0 = torch default)")
        _require(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        _require(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        _require(0.0 <= self.label_smoothing < 1.0, f"{p}.label_smoothing", "must be in [0, 1)")
        _require(self.grad_clip >= 0, f"{p}.grad_clip", "must be >= 0 (0 = off)")
        _require(self.batch_tokens >= 1, f"{p}.batch_tokens", "must be >= 1")
        _require(self.max_batch_sentences >= 1, f"{p}.max_batch_sentences", "must be >= 1")
        _require(self.num_workers >= 0, f"{p}.num_workers", "must be >= 0")
        _require(self.max_epochs >= 1, f"{p}.max_epochs", "must be >= 1")
        _require(self.max_steps == -1 or self.max_steps >= 1, f"{p}.max_steps",
                 "must be -1 (no limit) or >= 1")
        _require(self.max_minutes > 0, f"{p}.max_minutes", "must be > 0")
        _require(0 < self.limit_train_batches, f"{p}.limit_train_batches",
                 "must be > 0 (a fraction <= 1.0 or a batch count)")
        _require(self.val_every_steps >= 1, f"{p}.val_every_steps", "must be >= 1")
        _require(self.val_bleu_sentences >= 1, f"{p}.val_bleu_sentences", "must be >= 1")
        _require(self.val_samples >= 0, f"{p}.val_samples", "must be >= 0")
        _require(self.early_stopping_patience >= 1, f"{p}.early_stopping_patience",
                 "must be >= 1")
        _require(self.log_every_steps >= 1, f"{p}.log_every_steps", "must be >= 1")


@dataclass(frozen=True)
class SearchConfig:
    beam_size: int
    length_penalty: float
    max_len_ratio: float
    max_len_offset: int
    nbest: int
    batch_size: int
    precision: str = "fp32"  # decoding: auto | fp32 | bf16 (`nmt.decode_precision`); fp32 for
    # files written before the setting (model folders, exported pyfuncs): they decode as before

    def __post_init__(self) -> None:
        p = "evaluate.search"
        _require(self.precision in DECODE_PRECISIONS, f"{p}.precision",
                 f"must be one of {', '.join(DECODE_PRECISIONS)}, got {self.precision!r}")
        if problem := beam_problem(self.beam_size, self.nbest):
            raise ConfigError(f"{p}.{problem[0]}", problem[1])
        _require(self.length_penalty >= 0, f"{p}.length_penalty", "must be >= 0")
        _require(self.max_len_ratio > 0, f"{p}.max_len_ratio", "must be > 0")
        _require(self.max_len_offset >= 0, f"{p}.max_len_offset", "must be >= 0")
        _require(self.batch_size >= 1, f"{p}.batch_size", "must be >= 1")

    def sentences_per_batch(self, beam_size: int) -> int:
        """Sources decoded together at `beam_size` when the caller names no batch size:
        `batch_size` at the configured beam width; another width keeps the hypotheses per batch
        (batch_size x beam_size rows), so greedy decodes beam_size times as many sources."""
        return max(1, self.batch_size * self.beam_size // max(beam_size, 1))


@dataclass(frozen=True)
class ShortlistConfig:
    top_k: int
    frequent: int

    def __post_init__(self) -> None:
        p = "shortlist"
        _require(self.top_k >= 0, f"{p}.top_k",
                 f"must be >= 0 (0 = no shortlist), got {self.top_k}")
        _require(self.frequent >= 0, f"{p}.frequent", f"must be >= 0, got {self.frequent}")


@dataclass(frozen=True)
class EvaluateConfig:
    search: SearchConfig
    sample_size: int
    heatmaps: int
    length_buckets: list[int]

    def __post_init__(self) -> None:
        p = "evaluate"
        _require(self.sample_size >= 0, f"{p}.sample_size", "must be >= 0")
        _require(self.heatmaps >= 0, f"{p}.heatmaps", "must be >= 0")
        _require(self.length_buckets == sorted(set(self.length_buckets)), f"{p}.length_buckets",
                 "must be strictly increasing")


@dataclass(frozen=True)
class ExportConfig:
    registered_model: str
    promotion_margin: float
    parity_sentences: int

    def __post_init__(self) -> None:
        p = "export"
        _require(bool(self.registered_model), f"{p}.registered_model", "must not be empty")
        _require(self.promotion_margin >= 0, f"{p}.promotion_margin", "must be >= 0")
        _require(self.parity_sentences >= 1, f"{p}.parity_sentences", "must be >= 1")


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str
    experiment: str

    def __post_init__(self) -> None:
        _require(bool(self.experiment), "tracking.experiment", "must not be empty")


@dataclass(frozen=True)
class Params:
    seed: int
    download: DownloadConfig
    validate: ValidateConfig
    vectorize: VectorizeConfig
    model: ModelConfig
    train: TrainConfig
    shortlist: ShortlistConfig
    evaluate: EvaluateConfig
    export: ExportConfig
    tracking: TrackingConfig


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(kind))
    return getattr(kind, "__name__", str(kind))


def _check_value(kind: Any, value: object, key: str) -> object:
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}; "
                                   f"got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {type(value).__name__}")
        return [_check_value(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported type for {key}: {kind}")  # pragma: no cover
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float) and isinstance(value, bool):
        raise ConfigError(key, f"expected {kind.__name__}, got bool {value!r}")
    if not isinstance(value, kind):
        hint = " (write floats as 0.001 or 1.0e-3: YAML reads 1e-3 as a string)" if (
            kind is float and isinstance(value, str)) else ""
        raise ConfigError(key, f"expected {_type_name(kind)}, got {type(value).__name__} "
                               f"{value!r}{hint}")
    return value


def _build(cls: type[T], raw: object, where: str = "") -> T:
    if not isinstance(raw, dict):
        raise ConfigError(where or "<root>", f"expected a mapping, got {type(raw).__name__}")
    prefix = f"{where}." if where else ""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = [f.name for f in fields]
    # a field with a default is a key added later: files written before it (a model folder's
    # config.json) read with the default; params.yaml lists it
    optional = {f.name for f in fields if f.default is not dataclasses.MISSING}
    if extra := sorted(set(raw) - set(names)):
        raise ConfigError(prefix + str(extra[0]), f"unknown key; allowed: {', '.join(names)}")
    values = {}
    for name in names:
        key = prefix + name
        if name not in raw:
            if name in optional:
                continue
            raise ConfigError(key, "missing; add it to params.yaml")
        kind = hints[name]
        values[name] = (
            _build(kind, raw[name], key) if dataclasses.is_dataclass(kind)
            else _check_value(kind, raw[name], key)
        )
    return cls(**values)


def merge(base: Mapping[str, Any], override: Mapping[str, Any], where: str = "") -> dict:
    """Deep-merge `override` into a copy of `base`; an override key absent from base is an error."""
    out = dict(base)
    for key, value in override.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in base:
            raise ConfigError(dotted, "unknown key in profile; it must exist in params.yaml")
        if isinstance(value, Mapping) and isinstance(base[key], Mapping):
            out[key] = merge(base[key], value, dotted)
        else:
            out[key] = value
    return out


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping, with an error naming the file when it is missing or malformed."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(str(path), "params file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "expected a YAML mapping at the top level")
    return raw


def parse_params(raw: Mapping[str, Any]) -> Params:
    """Build `Params` from an already-loaded mapping."""
    return _build(Params, dict(raw))


def load_params(path: Path | str = "params.yaml", profile: Path | str | None = None) -> Params:
    """Load `params.yaml`, optionally with a profile of overrides merged over it."""
    raw = read_yaml(Path(path))
    if profile is not None:
        raw = merge(raw, read_yaml(Path(profile)))
    return parse_params(raw)


def flatten(obj: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Yield `(dotted_key, value)` for every leaf of a params dataclass (MLflow param names)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from flatten(getattr(obj, f.name), f"{prefix}{f.name}.")
    else:
        yield prefix.rstrip("."), obj
