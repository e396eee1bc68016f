"""Digest of the training batches a processed folder gives, and the data module's memory.

Builds `TranslationDataModule` as the train stage does (params `seed` and `train`), then hashes
every train batch of the first epochs (the tensors `src`, `src_lengths`, `trg` and `n_tokens`, in
order) and every validation batch and the val/bleu subset. Two versions of the code that print
the same digests feed training the same batches in the same order. Also reports the time and
peak RSS of `setup` and of one pass over the train batches (each in this process; run it once
per measurement).

Usage: python bench/batch_digest.py --processed data/processed [--params params.yaml]
           [--profile FILE] [--epochs 2] [--world-size 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from nmt.config import load_params
from nmt.data.datamodule import TranslationDataModule, bleu_subset


def _update(digest: Any, batch: Any) -> None:
    for tensor in (batch.src, batch.src_lengths, batch.trg):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(str(int(batch.n_tokens)).encode())


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def digests(processed: Path, params_path: Path, profile: Path | None, epochs: int,
            world_size: int) -> dict[str, Any]:
    """Digests per train epoch, of the validation batches and of the val/bleu subset."""
    params = load_params(params_path, profile)
    start = time.perf_counter()
    dm = TranslationDataModule(processed, params.train, params.seed, world_size)
    dm.setup("fit")
    out: dict[str, Any] = {"setup_s": round(time.perf_counter() - start, 2),
                           "setup_peak_rss_mb": _peak_rss_mb(),
                           "batches_per_epoch": dm.batches_per_epoch}
    loader = dm.train_dataloader()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        digest, count, start = hashlib.sha256(), 0, time.perf_counter()
        for batch in loader:
            _update(digest, batch)
            count += 1
        out[f"train_epoch{epoch}"] = {"batches": count, "sha256": digest.hexdigest(),
                                      "s": round(time.perf_counter() - start, 2)}
    digest = hashlib.sha256()
    for batch in dm.val_dataloader():
        _update(digest, batch)
    out["valid_sha256"] = digest.hexdigest()
    assert dm.valid_split is not None
    subset = bleu_subset(dm.valid_split, params.train.val_bleu_sentences, params.seed)
    digest = hashlib.sha256(json.dumps([subset.sources, subset.references]).encode())
    for seq in subset.src:
        digest.update(np.asarray(seq, dtype=np.int32).tobytes())
    out["bleu_subset_sha256"] = digest.hexdigest()
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile", type=Path, default=None, help="params overrides file")
    parser.add_argument("--epochs", type=int, default=2, help="train epochs to hash")
    parser.add_argument("--world-size", type=int, default=1, help="ranks (rank 0 is hashed)")
    args = parser.parse_args(argv)
    print(json.dumps(digests(args.processed, args.params, args.profile, args.epochs,
                             args.world_size), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
