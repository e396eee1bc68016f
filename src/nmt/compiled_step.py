"""Compiled Transformer decoding for low-latency serving (`nmt serve --compile`).

A one-sentence beam step runs some 200 small ATen calls through Python around about 0.5 ms of
matrix products (5 rows x D 256, two layers). AOTInductor (`torch._inductor`) compiles two
programs, each exported once with `torch.export` for any sizes, into shared libraries that run
as one call with their element-wise work fused:
- `EncoderStack`: the encoder and the decoder's initial state (cross-attention keys/values);
- `LayerStack`: the decoder layers and final LayerNorm of one step, with the state's pending row
  selection and the cache extension inside; rows, cache rows, positions, encoder entries and
  source length are free, so one program serves beam and greedy search at any batch.
The embedding, the positions, the output layer (and the lexical shortlist) and the search stay
eager. The programs are built in the decoding precision: bf16 programs use Inductor's C++ GEMM
templates (AMX micro-kernels where the CPU has them, `INDUCTOR_OPTIONS`). Xeon with AMX, one
thread, the default model: a 5-row step fp32 1.66 -> 0.97 ms, bf16 1.73 -> 0.52 ms; one sentence
over REST p50 eager bf16 20.2-21.2 -> compiled bf16 9.2-9.4 ms (fp32 programs: 12.0-12.2);
fp32 programs give the eager fp32 outputs on the whole test split, bf16 ones stay within 0.1
BLEU of fp32 (reports/bench/serve_compiled_amx.json). Steps of more than `MAX_ROWS` rows and
RNN models decode eagerly.

Cost: an export and a C++ build, 30 s (fp32) to 40-60 s (bf16, with its GEMM autotuning) on 2
cores, at the first start on a machine; the libraries are cached (`cache_dir`, default
`~/.cache/nmt/compiled`, or `NMT_COMPILE_CACHE`), keyed by the weights, the torch version, the
CPU's vector ISA and bf16 units, so a restart loads them in a fraction of a second. Where
compiling fails (no C++ compiler, say) decoding stays eager, with a one-line warning: never an
error at start-up. The code is generated for the CPU at hand, which is why it is built where it
runs and not shipped with the model.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from nmt.model.transformer import Transformer, TransformerDecoder, TransformerState

log = logging.getLogger(__name__)

CACHE_ENV = "NMT_COMPILE_CACHE"
PROGRAM_VERSION = 3  # bump when a program changes: the cache key includes it
# the compiled step runs batches of up to this many rows (hypotheses); larger ones run eagerly.
# Step of the default model, one thread, Xeon with AMX (reports/bench/serve_compiled_amx.json):
# fp32 5 rows 1.66 -> 0.97 ms, 40 rows 3.75 -> 2.88, 80 rows 4.23 -> 4.86 (slower: batched
# products amortise the per-op cost, and the eager step's grouped cross-attention, one (K, S)
# product per sentence, beats the program's per-row one), 640 rows 38.4 -> 41.8; bf16 (against
# the row-bucketed eager copy) 5 rows 1.73 -> 0.52 ms, 80 rows 3.75 -> 1.80, 640 rows 14.6 ->
# 11.9: faster at every size measured (up to the default batch's 640 hypotheses)
MAX_ROWS = {torch.float32: 64, torch.bfloat16: 1024}


class EncoderStack(nn.Module):
    """Encoding and the decoder's initial state as one program: forward(src (B, S) long,
    src_lengths (B,) long) -> encoder outputs (B, S, D), mask (B, S), cross_k, cross_v
    (B, L, S, D) (`Transformer.encode` and `TransformerDecoder.init_state`)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, src_lengths: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return encode_with_cross(self.model, src, src_lengths)


def encode_with_cross(model: Transformer, src: Tensor, src_lengths: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`EncoderStack`'s outputs computed eagerly (also its body when exported)."""
    encoded = model.encode(src, src_lengths)
    state = model.decoder.init_state(encoded)
    return encoded.outputs, encoded.mask, state.cross_k, state.cross_v


class LayerStack(nn.Module):
    """The decoder step from the positioned input to the final-norm features, as one program.

    forward(x (N, 1, D), self_k, self_v (R, L, T, D), rows (N,), entry (N,), cross_k, cross_v
    (E, L, S, D), mask (E, S)) -> features (N, D), self_k, self_v (N, L, T + 1, D), weights
    (N, S): row i continues cache row rows[i] and reads encoder entry entry[i]. The layers run
    their teacher-forcing `forward` with one new position (the same sums as `step`), so the
    program has no in-place writes.
    """

    def __init__(self, decoder: TransformerDecoder) -> None:
        super().__init__()
        self.layers = decoder.layers
        self.norm = decoder.norm

    def forward(self, x: Tensor, self_k: Tensor, self_v: Tensor, rows: Tensor, entry: Tensor,
                cross_k: Tensor, cross_v: Tensor, mask: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        past_k, past_v = self_k.index_select(0, rows), self_v.index_select(0, rows)
        cross_k, cross_v = cross_k.index_select(0, entry), cross_v.index_select(0, entry)
        allowed = mask.index_select(0, entry)[:, None, :]  # (N, 1, S)
        keys, values, weights = [], [], None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, k, v, weights = layer(x, past_k[:, i], past_v[:, i], cross_k[:, i],
                                     cross_v[:, i], allowed, need_weights=i == last)
            keys.append(k)
            values.append(v)
        assert weights is not None
        new_k = torch.cat([past_k, torch.stack(keys, dim=1)], dim=2)  # (N, L, T + 1, D)
        new_v = torch.cat([past_v, torch.stack(values, dim=1)], dim=2)
        return self.norm(x)[:, 0], new_k, new_v, weights[:, 0]


def cache_key(model: Transformer) -> str:
    """Hex digest of what the compiled libraries depend on: weights (and so their dtype), torch,
    the CPU's ISA and bf16 units (a bf16 program uses AMX tiles where the CPU has them)."""
    from nmt.precision import cpu_bf16_flags

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(f"{PROGRAM_VERSION} {torch.__version__} "
                  f"{torch.backends.cpu.get_cpu_capability()} {cpu_bf16_flags()}".encode())
    return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
    """`NMT_COMPILE_CACHE`, else ~/.cache/nmt/compiled."""
    if value := os.environ.get(CACHE_ENV, "").strip():
        return Path(value)
    return Path.home() / ".cache" / "nmt" / "compiled"


def _export_encoder(model: Transformer) -> Any:
    """torch.export of `EncoderStack` with the batch and the source length free."""
    from torch.export import Dim

    sentences = Dim("sentences")
    source = Dim("source", min=1, max=model.encoder.positions.max_positions)
    args = (torch.full((2, 3), 4, dtype=torch.long), torch.tensor([3, 2]))
    dims = {"src": {0: sentences, 1: source}, "src_lengths": {0: sentences}}
    with torch.no_grad():
        return torch.export.export(EncoderStack(model).eval(), args, dynamic_shapes=dims)


def _export_step(model: Transformer) -> Any:
    """torch.export of `LayerStack` with rows, cache rows, positions, entries and source
    length free (example sizes all >= 2 and distinct, so none is specialised)."""
    from torch.export import Dim

    decoder = model.decoder
    layers, width = len(decoder.layers), decoder.norm.normalized_shape[0]
    n, r, t, e, s = 6, 3, 3, 2, 4
    dtype = decoder.norm.weight.dtype
    args = (torch.zeros(n, 1, width, dtype=dtype), torch.zeros(r, layers, t, width, dtype=dtype),
            torch.zeros(r, layers, t, width, dtype=dtype), torch.arange(n) % r,
            torch.arange(n) % e, torch.zeros(e, layers, s, width, dtype=dtype),
            torch.zeros(e, layers, s, width, dtype=dtype), torch.ones(e, s, dtype=torch.bool))
    rows, cache_rows, entries = Dim("rows"), Dim("cache_rows"), Dim("entries")
    past = Dim("past", min=0, max=decoder.positions.max_positions)
    source = Dim("source", min=2, max=1 << 16)
    dims = {"x": {0: rows}, "self_k": {0: cache_rows, 2: past},
            "self_v": {0: cache_rows, 2: past}, "rows": {0: rows}, "entry": {0: rows},
            "cross_k": {0: entries, 2: source}, "cross_v": {0: entries, 2: source},
            "mask": {0: entries, 1: source}}
    with torch.no_grad():
        return torch.export.export(LayerStack(decoder).eval(), args, dynamic_shapes=dims)


PROGRAMS = {"encoder": _export_encoder, "decoder_step": _export_step}
# Inductor options by weight dtype. bf16: its C++ GEMM templates (AMX micro-kernels where the CPU
# has them) beat oneDNN's calls at a few rows: a 5-row step 665 -> 311 us, 40 rows 2.36 -> 0.91
# ms, against the fp32 program (max_autotune benchmarks the choices at build time, ~10 s more).
# fp32: the defaults (max_autotune: 5 rows 4% faster, 40 rows 13% slower; freezing: no gain).
INDUCTOR_OPTIONS: dict[torch.dtype, dict[str, Any]] = {
    torch.float32: {},
    torch.bfloat16: {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"},
}


def compile_programs(model: Transformer, cache_dir: Path | None = None) -> dict[str, Any]:
    """The compiled `EncoderStack` and `LayerStack` of a model (keys of `PROGRAMS`),
    each from the cache or built now (and cached).

    Raises whatever export or the C++ build raises; `CompiledTransformer.build` turns that into
    a warning.
    """
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    folder = default_cache_dir() if cache_dir is None else Path(cache_dir)
    key = cache_key(model)
    programs = {}
    for name, export in PROGRAMS.items():
        path = folder / f"{name}-{key}.pt2"
        if path.is_file():
            try:
                programs[name] = aoti_load_package(str(path))
                continue
            except Exception as exc:  # noqa: BLE001 - a damaged cache entry is rebuilt
                log.warning("%s: unreadable compiled program (%s); compiling again", path,
                            _first_line(exc))
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        log.info("compiling the %s (once per model and machine; cached in %s) ...",
                 name.replace("_", " "), folder)
        tmp = folder / f".{path.stem}.{os.getpid()}.pt2"  # a package path must end in .pt2
        try:
            aoti_compile_and_package(
                export(model), package_path=str(tmp),
                inductor_configs=INDUCTOR_OPTIONS[model.decoder.norm.weight.dtype])
            os.replace(tmp, path)  # a whole library or none: never a half-written cache entry
        finally:
            tmp.unlink(missing_ok=True)
        log.info("compiled the %s in %.0f s: %s", name.replace("_", " "),
                 time.perf_counter() - start, path)
        programs[name] = aoti_load_package(str(path))
    return programs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def flat_runner(program: Any) -> Any:
    """A call of `program` on a flat list of tensors, returning the flat outputs.

    The package's `__call__` re-parses its input and output tree specs (JSON) at every call;
    the loader's `boxed_run` takes the flat list directly (about 5% of a one-sentence request).
    """
    loader = getattr(program, "loader", None)
    if hasattr(loader, "boxed_run"):
        return loader.boxed_run
    return lambda flat: program(*flat)


class CompiledDecoder:
    """`TransformerDecoder`'s `embed`, `step`, `logits` and `output`, with `step` run by the
    compiled `LayerStack` wherever it applies (fp32 rows after the first position)."""

    def __init__(self, decoder: TransformerDecoder, program: Any, dtype: torch.dtype) -> None:
        self.decoder = decoder
        self.dtype = dtype
        self.output = decoder.output
        self._run = flat_runner(program)

    def embed(self, tokens: Tensor) -> Tensor:
        return self.decoder.embed(tokens)

    def logits(self, features: Tensor) -> Tensor:
        return self.decoder.logits(features)

    def step(self, state: TransformerState,
             emb: Tensor) -> tuple[Tensor, TransformerState, Tensor]:
        """As `TransformerDecoder.step`."""
        position = state.position
        rows = state.num_rows
        if (rows > MAX_ROWS[self.dtype] or emb.dtype != self.dtype
                or position >= self.decoder.positions.max_positions or state.mask.size(1) < 2):
            return self.decoder.step(state, emb)
        x = self.decoder.add_positions(emb[:, None, :], position)  # (N, 1, D)
        index = torch.arange(rows, device=emb.device)
        cache_rows = index if state.rows is None else state.rows
        entry = index // state.group
        features, self_k, self_v, weights = self._run(
            [x, state.self_k, state.self_v, cache_rows, entry, state.cross_k, state.cross_v,
             state.mask])
        return features, replace(state, self_k=self_k, self_v=self_v, rows=None), weights


class _Encoded(NamedTuple):
    """The encoder program's outputs (`EncoderStack`)."""

    outputs: Tensor
    mask: Tensor
    cross_k: Tensor
    cross_v: Tensor


class CompiledTransformer:
    """A `Transformer` for the search (`encode`, `init_state`, `step`, `decoder`) whose decoder
    step is compiled; `build` returns None where it cannot be.

    Not an `nn.Module`: the model is put in eval mode once, here, so the search does not switch
    its 80-odd modules to eval and back at every call (0.36 ms of a 14 ms sentence).
    """

    def __init__(self, model: Transformer, programs: dict[str, Any]) -> None:
        self.model = model.eval()
        self.dtype = model.decoder.norm.weight.dtype
        self.decoder = CompiledDecoder(model.decoder, programs["decoder_step"], self.dtype)
        self._encode = flat_runner(programs["encoder"])

    @classmethod
    def build(cls, model: Any, cache_dir: Path | None = None, precision: str = "fp32",
              eager: Transformer | None = None) -> CompiledTransformer | None:
        """Compile an fp32 CPU `Transformer` for decoding in `precision` (fp32, or bf16: a bf16
        copy of it is compiled). `eager`: the model that runs the parts left eager (embedding,
        output layer, steps above `MAX_ROWS`) in that precision (default: `model` or its bf16
        copy; `Translator` passes its row-bucketed bf16 copy). None (with a warning naming why)
        for another model, or when export or the C++ build fails."""
        if not isinstance(model, Transformer):
            log.warning("compiled decoding is for the Transformer; this %s decodes eagerly",
                        type(model).__name__)
            return None
        weight = model.decoder.norm.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            log.warning("compiled decoding needs an fp32 model on CPU (this one: %s on %s); "
                        "decoding eagerly", weight.dtype, weight.device)
            return None
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: fp32 or bf16, got {precision!r}")
        target = model if precision == "fp32" else copy.deepcopy(model).bfloat16().eval()
        try:
            programs = compile_programs(target, cache_dir)
        except Exception as exc:  # noqa: BLE001 - any build failure falls back to eager
            log.warning("cannot compile the model (%s: %s); decoding eagerly",
                        type(exc).__name__, _first_line(exc))
            return None
        return cls(target if eager is None else eager, programs)

    @property
    def src_vocab_size(self) -> int:
        return self.model.src_vocab_size

    @property
    def trg_vocab_size(self) -> int:
        return self.model.trg_vocab_size

    def encode(self, src: Tensor, src_lengths: Tensor) -> _Encoded:
        """As `Transformer.encode`, with the decoder's cross-attention keys and values."""
        self.model.check_source(src, src_lengths)
        if src.size(1) > self.model.encoder.positions.max_positions:
            # eager: the model's own error (learned positions) or positions past the program's
            return _Encoded(*encode_with_cross(self.model, src, src_lengths))
        return _Encoded(*self._encode([src, src_lengths]))

    def init_state(self, encoded: _Encoded) -> TransformerState:
        """As `Transformer.init_state`: empty self-attention cache."""
        batch, layers, _, width = encoded.cross_k.shape
        empty = encoded.outputs.new_zeros(batch, layers, 0, width)
        return TransformerState(self_k=empty, self_v=empty, enc_out=encoded.outputs,
                                mask=encoded.mask, cross_k=encoded.cross_k,
                                cross_v=encoded.cross_v)

    def step(self, state: TransformerState,
             prev_tokens: Tensor) -> tuple[Tensor, TransformerState, Tensor]:
        """As `Transformer.step`."""
        features, state, weights = self.decoder.step(state, self.decoder.embed(prev_tokens))
        return self.decoder.logits(features).log_softmax(dim=-1), state, weights
