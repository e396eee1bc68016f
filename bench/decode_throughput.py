"""Decode throughput on the test split: the tutorial's one-at-a-time greedy loop against batching.

Prints one JSON object. For each device (CPU, plus CUDA when available) and the same model:
    loop_greedy     one sentence per call, greedy (how the classic PyTorch tutorial decodes)
    batched_greedy  length-sorted batches, greedy
    batched_beam    length-sorted batches, beam --beam (GNMT length penalty and length cap from
                    the model's evaluate.search settings)
Batches hold --batch-size sources; without it the product's default (`Translator`: the model's
evaluate.search.batch_size at its beam, and as many hypotheses per batch at another width, so
greedy decodes 640 sources at a time where beam 5 decodes 128).
with sentences/s, target tokens/s (EOS included), outputs that hit the length cap and corpus
BLEU against all references. These use the model folder's lexical shortlist when it has one
(`models/shortlist.npz`, as the product does); then on CPU also
    loop_greedy_full_vocab   the loop over the whole target vocabulary (exactly the tutorial's way)
    batched_beam_full_vocab  batched beam over the whole vocabulary, with its agreement with
                    shortlisted beam
and with --int8 on CPU also
    batched_beam_int8  batched beam with the product's int8 decoding mode (`nmt translate
                    --int8`, `NMT_INT8=1` when serving: `nmt.model.quantize`), with its
                    agreement with fp32 beam
    loop_greedy_int8   the one-at-a-time loop in int8 (weights 4x smaller help it too)
and on CPU, fp32 against bf16 decoding side by side (`evaluate.search.precision`,
`nmt translate --precision`, `nmt.decode_precision`), `precision` in the JSON:
    fp32, bf16      batched greedy and batched beam in each precision (bf16 only on a CPU with
                    bf16 units; otherwise the reason), each with sentences/s and BLEU (every
                    reference, `nmt.metrics.corpus_bleu`)
    bf16_vs_fp32    per search: share of identical outputs, BLEU difference, speed-up, and
                    whether BLEU stays within 0.1 of fp32 (the bar for bf16 as the default)
The fp32 and bf16 runs alternate --repeats times per search (best time kept), so both see the
same machine load. --precision-only skips every other mode (add --full-vocab to compare without
the shortlist).
Also the speed-ups and whether the targets are met (batched beam 5 >= 10x the one-at-a-time
fp32 greedy loop and >= 150 sentences/s; for int8 also against the int8 loop). Every mode goes
through `nmt.translator.Translator`, tokenisation and detokenisation included. The loop is
timed on --loop-limit evenly spaced sources only (it is slow); the batched modes on all (or
--limit) distinct test sources.

    python bench/decode_throughput.py --model-dir models --processed data/processed
    python bench/decode_throughput.py --precision-only --int8 --out reports/bench/decode_bf16.json

CPU numbers depend on the cores free at the time: on a shared machine, run it twice.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import sacrebleu
import torch

from nmt import precision as hw
from nmt.config import ConfigError
from nmt.data.vectorize import load_split
from nmt.metrics import corpus_bleu
from nmt.translator import Translation, Translator

T = TypeVar("T")
WARMUP = 256  # sources decoded before timing when no --batch-size is given
TARGET_SPEEDUP = 10.0  # batched beam 5 vs the one-at-a-time greedy loop
TARGET_BEAM_PER_S = 150.0  # batched beam 5 on CPU, default model
# issue 16, on a CPU with bf16 units (fp32 there: 335 and 1,046 sentences/s)
TARGET_BF16 = {"batched_beam": 400.0, "batched_greedy": 1300.0}
MAX_BLEU_DROP = 0.1  # bf16 may be the default only within this much BLEU of fp32


def _mode(translations: Sequence[Translation], seconds: float,
          references: Sequence[Sequence[str]] | None) -> dict[str, float | int]:
    n = len(translations)
    tokens = sum(len(t.tokens[0]) + 1 for t in translations)
    out: dict[str, float | int] = {
        "sentences": n, "seconds": round(seconds, 3),
        "sentences_per_s": round(n / max(seconds, 1e-9), 1),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "hit_max_len": sum(t.hit_max_len for t in translations)}
    if references is not None:
        width = max(len(r) for r in references)
        streams = [[r[k] if k < len(r) else None for r in references] for k in range(width)]
        out["bleu"] = round(sacrebleu.BLEU().corpus_score([t.text for t in translations],
                                                          streams).score, 2)
    return out


def _timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def _loop_picks(n: int, loop_limit: int) -> np.ndarray:
    """Evenly spaced source indices for the loop (the split keeps corpus order, and fra.txt is
    sorted by sentence length)."""
    return np.unique(np.linspace(0, n - 1, min(loop_limit, n)).astype(int))


def _time_loop(translator: Translator, sources: list[str]) -> tuple[list[Translation], float]:
    """One sentence per call, greedy: how the classic tutorial decodes."""
    return _timed(lambda: [translator.translate([s], beam_size=1)[0] for s in sources],
                  translator.device)


def bench_device(translator: Translator, sources: list[str], references: list[list[str]],
                 loop_limit: int, batch_size: int | None,
                 beam: int) -> tuple[dict[str, object], list[Translation]]:
    """Time the three modes on the translator's device; also returns the beam outputs."""
    device = translator.device
    translator.translate(sources[:batch_size or WARMUP], beam_size=beam,  # warm-up
                         batch_size=batch_size)
    picked = _loop_picks(len(sources), loop_limit)
    loop, loop_s = _time_loop(translator, [sources[i] for i in picked])
    greedy, greedy_s = _timed(lambda: translator.translate(sources, beam_size=1,
                                                           batch_size=batch_size), device)
    beamed, beam_s = _timed(lambda: translator.translate(sources, beam_size=beam, nbest=1,
                                                         batch_size=batch_size), device)
    modes = {"loop_greedy": _mode(loop, loop_s, [references[i] for i in picked]),
             "batched_greedy": _mode(greedy, greedy_s, references),
             "batched_beam": _mode(beamed, beam_s, references)}
    loop_rate = float(modes["loop_greedy"]["sentences_per_s"])
    beam_rate = float(modes["batched_beam"]["sentences_per_s"])
    greedy_rate = float(modes["batched_greedy"]["sentences_per_s"])
    return {**modes,
            "speedup_batched_greedy_vs_loop": round(greedy_rate / max(loop_rate, 1e-9), 1),
            "speedup_batched_beam_vs_loop": round(beam_rate / max(loop_rate, 1e-9), 1),
            "loop_matches_batched_greedy": sum(a.tokens == greedy[i].tokens for a, i in
                                               zip(loop, picked, strict=True)) / len(loop)
            }, beamed


def bench_int8(translator: Translator, sources: list[str], references: list[list[str]],
               loop_limit: int, batch_size: int | None, beam: int,
               fp32: Sequence[Translation]) -> dict[str, object]:
    """Batched beam and the one-at-a-time loop with the translator switched to int8 (CPU)."""
    translator.to_int8()
    translator.translate(sources[:batch_size or WARMUP], beam_size=beam,  # warm-up
                         batch_size=batch_size)
    picked = _loop_picks(len(sources), loop_limit)
    loop, loop_s = _time_loop(translator, [sources[i] for i in picked])
    beamed, seconds = _timed(lambda: translator.translate(sources, beam_size=beam,
                                                          batch_size=batch_size), translator.device)
    same = sum(a.tokens == b.tokens for a, b in zip(beamed, fp32, strict=True)) / len(fp32)
    return {"batched_beam_int8": {**_mode(beamed, seconds, references),
                                  "same_output_as_fp32": round(same, 3)},
            "loop_greedy_int8": _mode(loop, loop_s, [references[i] for i in picked])}


def bench_full_vocab(translator: Translator, sources: list[str], references: list[list[str]],
                     loop_limit: int, batch_size: int | None, beam: int,
                     shortlisted: Sequence[Translation]) -> dict[str, object]:
    """The loop and batched beam over the whole target vocabulary (no shortlist)."""
    full = translator.without_shortlist()
    picked = _loop_picks(len(sources), loop_limit)
    loop, loop_s = _time_loop(full, [sources[i] for i in picked])
    beamed, seconds = _timed(lambda: full.translate(sources, beam_size=beam, nbest=1,
                                                    batch_size=batch_size), full.device)
    same = sum(a.tokens == b.tokens for a, b in zip(beamed, shortlisted, strict=True))
    return {"loop_greedy_full_vocab": _mode(loop, loop_s, [references[i] for i in picked]),
            "batched_beam_full_vocab": {**_mode(beamed, seconds, references),
                                        "same_output_as_shortlist": round(same / len(beamed), 3)}}


def bench_precision(translator: Translator, sources: list[str], references: list[list[str]],
                    batch_size: int | None, beam: int, repeats: int,
                    int8: bool) -> dict[str, object]:
    """Batched greedy and beam in fp32 and bf16 (alternating runs, best time), compared."""
    runs: dict[str, Translator] = {"fp32": translator.to_precision("fp32")}
    out: dict[str, object] = {}
    try:
        runs["bf16"] = Translator(translator.model, translator.src_tok, translator.trg_tok,
                                  translator.search, translator.max_src_tokens,
                                  translator.shortlist, precision="bf16")
    except ConfigError as exc:
        out["bf16_skipped"] = exc.reason
    if int8:
        runs["int8"] = Translator(translator.model, translator.src_tok, translator.trg_tok,
                                  translator.search, translator.max_src_tokens,
                                  translator.shortlist, precision="fp32").to_int8()
    searches = {"batched_greedy": 1, "batched_beam": beam}
    results: dict[str, dict[str, object]] = {name: {} for name in runs}
    outputs: dict[tuple[str, str], list[Translation]] = {}
    for mode, width in searches.items():
        best: dict[str, float] = {}
        for t in runs.values():  # warm-up (autocast and allocator caches)
            t.translate(sources[:batch_size or WARMUP], beam_size=width, batch_size=batch_size)
        for _ in range(repeats):
            for name, t in runs.items():
                outputs[name, mode], seconds = _timed(
                    lambda t=t, w=width: t.translate(sources, beam_size=w, nbest=1,
                                                     batch_size=batch_size), t.device)
                best[name] = min(best.get(name, float("inf")), seconds)
        for name in runs:
            hyps = outputs[name, mode]
            results[name][mode] = {**_mode(hyps, best[name], None),
                                   "bleu": round(corpus_bleu([h.text for h in hyps],
                                                             references), 2)}
    out.update(results)
    for name in runs:
        if name == "fp32":
            continue
        versus: dict[str, object] = {}
        for mode in searches:
            a, b = outputs["fp32", mode], outputs[name, mode]
            same = sum(x.tokens == y.tokens for x, y in zip(a, b, strict=True)) / len(a)
            delta = (corpus_bleu([h.text for h in b], references)
                     - corpus_bleu([h.text for h in a], references))
            rate, base = (_rate(results[n], mode) for n in (name, "fp32"))
            versus[mode] = row = {"same_output_share": round(same, 4),
                                  "bleu_delta": round(delta, 3),
                                  "bleu_within_0.1": delta >= -MAX_BLEU_DROP,
                                  "speedup": round(rate / base, 2)}
            if name == "bf16":
                row |= {"target_per_s": TARGET_BF16[mode],
                        "target_met": rate >= TARGET_BF16[mode]}
        out[f"{name}_vs_fp32"] = versus
    return out


def _rate(result: dict[str, object], mode: str) -> float:
    return max(float(result[mode]["sentences_per_s"]), 1e-9)  # type: ignore[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--limit", type=int, default=None, help="distinct test sources (all)")
    parser.add_argument("--loop-limit", type=int, default=500,
                        help="sources for the slow one-at-a-time loop (default 500)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sources per batch (default: the product's, see above)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--no-cuda", action="store_true", help="CPU only even with a GPU")
    parser.add_argument("--int8", action="store_true",
                        help="also time the int8 decoding mode (batched beam and the loop) on CPU")
    parser.add_argument("--precision-only", action="store_true",
                        help="only fp32 against bf16 (and int8 with --int8), batched, on CPU")
    parser.add_argument("--full-vocab", action="store_true",
                        help="with --precision-only: the whole vocabulary, not the shortlist")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternating timed runs per precision (best kept; default 1)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sources, references = load_split(args.processed, "test").references()
    sources, references = sources[: args.limit], references[: args.limit]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.no_cuda else [])
    report: dict[str, object] = {
        "model_dir": str(args.model_dir), "test_sources": len(sources),
        "loop_sources": min(args.loop_limit, len(sources)),
        "batch_size": args.batch_size,  # null: the product's default per width
        "beam": args.beam, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "cpu_description": hw.describe_cpu()}
    if args.precision_only:
        translator = Translator.from_model_dir(args.model_dir, precision="fp32",
                                               shortlist=not args.full_vocab)
        report["full_vocab"] = translator.shortlist is None
        report["cpu"] = {"precision": bench_precision(
            translator, sources, references, args.batch_size, args.beam, args.repeats,
            args.int8)}
        return _emit(report, args.out)
    for name in devices:
        translator = Translator.from_model_dir(args.model_dir, device=name, precision="fp32")
        result, beamed = bench_device(translator, sources, references, args.loop_limit,
                                      args.batch_size, args.beam)
        if name == "cuda":
            result["gpu"] = torch.cuda.get_device_name(0)
        else:
            loop_rate = _rate(result, "loop_greedy")
            beam_rate = _rate(result, "batched_beam")
            targets = {"beam_vs_loop_10x": beam_rate / loop_rate >= TARGET_SPEEDUP,
                       "beam_150_per_s": beam_rate >= TARGET_BEAM_PER_S}
            if translator.shortlist is not None:
                sl = translator.shortlist
                result["shortlist"] = {"top_k": sl.top_k, "frequent": sl.frequent}
                result.update(bench_full_vocab(translator, sources, references, args.loop_limit,
                                               args.batch_size, args.beam, beamed))
                full_loop = _rate(result, "loop_greedy_full_vocab")
                result["speedup_batched_beam_vs_loop_full_vocab"] = round(beam_rate / full_loop,
                                                                          1)
                result["speedup_batched_beam_full_vocab_vs_loop_full_vocab"] = round(
                    _rate(result, "batched_beam_full_vocab") / full_loop, 1)
                targets["beam_vs_loop_full_vocab_10x"] = beam_rate / full_loop >= TARGET_SPEEDUP
            if args.int8:
                result.update(bench_int8(translator, sources, references, args.loop_limit,
                                         args.batch_size, args.beam, beamed))
                int8_rate = _rate(result, "batched_beam_int8")
                result["speedup_batched_beam_int8_vs_loop"] = round(int8_rate / loop_rate, 1)
                result["speedup_batched_beam_int8_vs_loop_int8"] = round(
                    int8_rate / _rate(result, "loop_greedy_int8"), 1)
                targets |= {"beam_int8_vs_loop_10x": int8_rate / loop_rate >= TARGET_SPEEDUP,
                            "beam_int8_150_per_s": int8_rate >= TARGET_BEAM_PER_S}
            result["targets_met"] = targets
            result["precision"] = bench_precision(_fresh(args.model_dir), sources, references,
                                                  args.batch_size, args.beam, args.repeats,
                                                  False)
        report[name] = result
    return _emit(report, args.out)


def _fresh(model_dir: Path) -> Translator:
    """An fp32 translator on a fresh model copy (the one benchmarked above may be int8 now)."""
    return Translator.from_model_dir(model_dir, precision="fp32")


def _emit(report: dict[str, object], out: Path | None) -> int:
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
