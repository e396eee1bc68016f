"""Training throughput on CPU: this project's default model vs the classic Keras tutorial model.

Prints one JSON object: target tokens/s, ms per step and peak RSS for
  ours:  `model` params (default: params.yaml) on length-bucketed batches of `train.batch_tokens`
         target tokens, with the training step of `nmt.lit_module` (label-smoothed CE, AdamW,
         gradient clipping), from data/processed when present, else synthetic ids with
         Tatoeba-like lengths;
  keras: the Keras lstm_seq2seq tutorial model (../shared/peers/seed_keras_port.py), re-built
         here with the same dims: char one-hot, LSTM(256) encoder/decoder, softmax Dense,
         RMSprop, batch 64, on the corpus' first 10,000 pairs (or synthetic chars); its target
         tokens are target characters.
Ours runs once per `--precisions` entry on the same batches: `32-true` (reported as `ours`)
and `bf16-mixed` (`ours_bf16`: the step under `torch.autocast("cpu", torch.bfloat16)`, as
Lightning's `bf16-mixed` does; weights, loss and optimizer state fp32), with the bf16/fp32
ratio; bf16 is skipped on a CPU without bf16 units. `cpu` names the CPU and its bf16 flags.
Ours runs with the train stage's malloc policy and oneDNN cache cap (`nmt.allocator`); with
`--malloc both` (the default) the fp32 run is repeated with the C library's default malloc
(`ours_system_malloc`, plus the ratio and each run's page faults and system CPU seconds).
Each model runs in a forked child so the peak RSS figures are separate. Timings on a shared
machine are noisy: compare numbers from the same run only.

Usage: python bench/train_throughput.py [--params params.yaml] [--processed data/processed]
                                        [--steps 30] [--warmup 5] [--threads 0]
                                        [--precisions 32-true,bf16-mixed] [--skip-keras]
                                        [--malloc keep|system|both]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nmt.allocator import bound_onednn_cache, keep_freed_memory
from nmt.config import load_params
from nmt.data.datamodule import BucketBatchSampler, PairsDataset, lengths_of
from nmt.data.vectorize import SplitData, load_split
from nmt.lit_module import sequence_loss
from nmt.model import build_model, count_parameters
from nmt.precision import describe_cpu

KERAS_SAMPLES, KERAS_LATENT, KERAS_BATCH = 10_000, 256, 64


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _faults_and_sys() -> tuple[int, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def _synthetic_split(n: int, vocab: int, seed: int) -> SplitData:
    rng = np.random.default_rng(seed)
    src_len = np.clip(rng.lognormal(2.0, 0.45, n).astype(int), 1, 60)
    trg_len = np.clip((src_len * rng.normal(1.15, 0.2, n)).astype(int), 1, 60)
    src = [rng.integers(4, vocab, k, dtype=np.int32) for k in src_len]
    trg = [rng.integers(4, vocab, k, dtype=np.int32) for k in trg_len]
    return SplitData(src, trg, [""] * n, [""] * n, np.arange(n, dtype=np.int64))


def _timed(step: Any, batches: list[Any], warmup: int) -> dict[str, float]:
    """Run `step` (-> target tokens, sentences) on every batch, timing all but `warmup` first."""
    for batch in batches[:warmup]:
        step(batch)
    tokens = sentences = 0
    start = time.perf_counter()
    for batch in batches[warmup:]:
        n_tokens, n_sentences = step(batch)
        tokens, sentences = tokens + n_tokens, sentences + n_sentences
    seconds = time.perf_counter() - start
    return {"target_tokens_per_s": round(tokens / seconds, 1),
            "sentences_per_s": round(sentences / seconds, 1),
            "ms_per_step": round(1000 * seconds / (len(batches) - warmup), 1)}


def bench_ours(params_path: Path, processed: Path, steps: int, warmup: int,
               precision: str = "32-true", malloc: str = "keep") -> dict[str, Any]:
    kept = keep_freed_memory("train") if malloc == "keep" else False
    bound_onednn_cache()  # as the train stage does (the fork saw no oneDNN work yet)
    params = load_params(params_path)
    cfg = params.train
    if (processed / "train.parquet").is_file():
        split, source = load_split(processed, "train"), f"{processed}/train.parquet"
        from nmt.data.vocab import load_tokenizers

        src_tok, trg_tok = load_tokenizers(processed / "tokenizers")
        vocab = (src_tok.vocab_size, trg_tok.vocab_size)
    else:
        vocab = (params.vectorize.src_vocab_size, params.vectorize.trg_vocab_size)
        split, source = _synthetic_split(60_000, vocab[1], params.seed), "synthetic"
    torch.manual_seed(params.seed)
    model = build_model(params.model, *vocab).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = BucketBatchSampler(lengths_of(split.src, 1), lengths_of(split.trg, 1),
                                 batch_tokens=cfg.batch_tokens,
                                 max_sentences=cfg.max_batch_sentences, seed=params.seed,
                                 shuffle=True)
    dataset = PairsDataset(split)
    batches = [dataset[rows] for rows, _ in zip(sampler, range(steps + warmup), strict=False)]

    def step(batch: Any) -> tuple[int, int]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(batch.src, batch.src_lengths, batch.trg_in)
            loss = sequence_loss(logits, batch.trg_out, cfg.label_smoothing) / batch.n_tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        float(loss.detach())  # the per-step NaN check's sync
        return batch.n_tokens, len(batch.src)

    faults, sys_s = _faults_and_sys()
    timing = _timed(step, batches, warmup)
    faults_after, sys_after = _faults_and_sys()
    return {"data": source, "precision": precision, "malloc": "keep" if kept else "system",
            "page_faults_timed": faults_after - faults,
            "system_cpu_s_timed": round(sys_after - sys_s, 2),
            "parameters": count_parameters(model),
            "batch_tokens": cfg.batch_tokens, "mean_sentences_per_batch": round(
                float(np.mean([len(b.src) for b in batches])), 1),
            **timing, "peak_rss_mb": round(_peak_rss_mb(), 1)}


class KerasTutorialSeq2Seq(nn.Module):
    """The tutorial's model: one-hot chars, LSTM encoder state -> LSTM decoder, Dense softmax."""

    def __init__(self, in_chars: int, out_chars: int, latent: int = KERAS_LATENT) -> None:
        super().__init__()
        self.enc = nn.LSTM(in_chars, latent, batch_first=True)
        self.dec = nn.LSTM(out_chars, latent, batch_first=True)
        self.out = nn.Linear(latent, out_chars)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, state = self.enc(x)
        h, _ = self.dec(y, state)
        return self.out(h)


def _keras_pairs(processed: Path) -> tuple[list[str], list[str], str]:
    path = processed / "train.parquet"
    if path.is_file():
        import pandas as pd

        frame = pd.read_parquet(path, columns=["en", "fr", "line"]).sort_values("line")
        frame = frame.head(KERAS_SAMPLES)
        return list(frame["en"]), list(frame["fr"]), f"first {len(frame)} lines of {path}"
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz .,!?'"))
    en = ["".join(rng.choice(letters, rng.integers(5, 20))) for _ in range(KERAS_SAMPLES)]
    fr = ["".join(rng.choice(letters, rng.integers(5, 30))) for _ in range(KERAS_SAMPLES)]
    return en, fr, "synthetic"


def bench_keras(processed: Path, steps: int, warmup: int) -> dict[str, Any]:
    src, fr, source = _keras_pairs(processed)
    tgt = ["\t" + t + "\n" for t in fr]
    in_chars, out_chars = sorted(set("".join(src))), sorted(set("".join(tgt)))
    ii = {c: i for i, c in enumerate(in_chars)}
    oi = {c: i for i, c in enumerate(out_chars)}
    max_in, max_out = max(map(len, src)), max(map(len, tgt))
    n = len(src)
    enc_x = torch.zeros(n, max_in, len(in_chars))
    dec_x = torch.zeros(n, max_out, len(out_chars))
    dec_y = torch.zeros(n, max_out, dtype=torch.long)
    mask = torch.zeros(n, max_out)
    for k, (s, t) in enumerate(zip(src, tgt, strict=True)):
        enc_x[k, torch.arange(len(s)), torch.tensor([ii[c] for c in s])] = 1
        ids = torch.tensor([oi[c] for c in t])
        dec_x[k, torch.arange(len(t)), ids] = 1
        dec_y[k, : len(t) - 1] = ids[1:]
        mask[k, : len(t) - 1] = 1
    torch.manual_seed(0)
    model = KerasTutorialSeq2Seq(len(in_chars), len(out_chars))
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    order = torch.randperm(n)
    batches = [order[i : i + KERAS_BATCH] for i in range(0, KERAS_BATCH * (steps + warmup),
                                                         KERAS_BATCH)]

    def step(j: torch.Tensor) -> tuple[int, int]:
        logits = model(enc_x[j], dec_x[j])
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), dec_y[j], reduction="none")
        loss = (loss * mask[j]).sum() / (mask[j].shape[0] * mask[j].shape[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return int(mask[j].sum()), len(j)

    timing = _timed(step, batches, warmup)
    return {"data": source, "parameters": count_parameters(model), "batch_sentences": KERAS_BATCH,
            "padded_length": max_out, **timing, "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _child(conn: Any, fn: Any, threads: int, *args: Any) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    conn.send(fn(*args))
    conn.close()


def _in_child(fn: Any, threads: int, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, threads, *args))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--precisions", default="32-true,bf16-mixed",
                        help="comma-separated: 32-true and/or bf16-mixed (ours only)")
    parser.add_argument("--skip-keras", action="store_true", help="ours only")
    parser.add_argument("--malloc", choices=("keep", "system", "both"), default="both",
                        help="ours with the train stage's malloc policy, the C library's "
                             "default, or both side by side (fp32)")
    args = parser.parse_args(argv)
    cpu = describe_cpu()
    flags = cpu["bf16_flags"]
    report: dict[str, Any] = {
        "device": "cpu", "cpu": cpu,
        "torch_threads": args.threads or torch.get_num_threads(), "steps": args.steps}
    for precision in args.precisions.split(","):
        key = {"32-true": "ours", "bf16-mixed": "ours_bf16"}[precision.strip()]
        if key == "ours_bf16" and not flags:
            report[key] = "skipped: this CPU has no bf16 units (amx_bf16, avx512_bf16)"
            continue
        report[key] = _in_child(bench_ours, args.threads, args.params, args.processed,
                                args.steps, args.warmup, precision.strip(),
                                "system" if args.malloc == "system" else "keep")
    ours, bf16 = report.get("ours"), report.get("ours_bf16")
    if args.malloc == "both":
        plain = _in_child(bench_ours, args.threads, args.params, args.processed, args.steps,
                          args.warmup, "32-true", "system")
        report["ours_system_malloc"] = plain
        if isinstance(ours, dict) and ours["malloc"] == "keep":
            report["malloc_keep_speedup_target_tokens_per_s"] = round(
                ours["target_tokens_per_s"] / plain["target_tokens_per_s"], 2)
    if isinstance(ours, dict) and isinstance(bf16, dict):
        report["bf16_speedup_target_tokens_per_s"] = round(
            bf16["target_tokens_per_s"] / ours["target_tokens_per_s"], 2)
    if not args.skip_keras:
        keras = _in_child(bench_keras, args.threads, args.processed, args.steps, args.warmup)
        report["keras_tutorial"] = keras
        if isinstance(ours, dict):
            report["speedup_target_tokens_per_s"] = round(
                ours["target_tokens_per_s"] / keras["target_tokens_per_s"], 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
