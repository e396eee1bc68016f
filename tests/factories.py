"""Test factories: one owner for the tiny configs, batches and archives the tests build.

Each factory returns a small, valid object; a test names only what it changes
(`tiny_model_cfg(rnn="gru", hidden=6)`), so the values a test depends on stand out and a new
config field is added in one place.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from typing import Any

import torch

from nmt.config import DownloadConfig, ModelConfig, TransformerConfig
from nmt.specials import BOS_ID, PAD_ID


def tiny_transformer_cfg(**overrides: object) -> TransformerConfig:
    """A 1-layer, 2-head, 8-wide transformer section (also the unused one of an `rnn` model)."""
    base = TransformerConfig(layers=1, heads=2, d_model=8, ff_dim=16, dropout=0.0,
                             positions="sinusoidal", max_positions=64)
    return dataclasses.replace(base, **overrides)


def tiny_model_cfg(**overrides: object) -> ModelConfig:
    """An 8-unit bidirectional LSTM with Luong attention, no dropout, tied embeddings.

    `overrides` replace fields; pass `transformer=tiny_transformer_cfg(...)` for the transformer.
    """
    base = ModelConfig(arch="rnn", transformer=tiny_transformer_cfg(),
                       rnn="lstm", emb_dim=8, hidden=8, enc_layers=1, dec_layers=1,
                       bidirectional=True, attention="luong_general", input_feeding=False,
                       dropout=0.0, tie_embeddings=True)
    return dataclasses.replace(base, **overrides)


def download_cfg(url: str, **overrides: object) -> DownloadConfig:
    """A download section fetching `url` with short timeouts, no retries, no checksum, no
    bundled copy and small size limits; `overrides` replace fields."""
    base = DownloadConfig(url=url, sha256="", bundled="", connect_timeout_s=0.5,
                          read_timeout_s=0.5, retries=0, backoff_s=0.0,
                          max_download_bytes=10_000_000, max_uncompressed_bytes=1_000_000,
                          max_compression_ratio=100.0, corpus_member="fra.txt")
    return dataclasses.replace(base, **overrides)


def build_zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip archive (bytes) holding `members` (name -> content) in insertion order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def decode_stepwise(model: Any, src: torch.Tensor, lengths: torch.Tensor,
                    trg_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Feed trg_in (B, T) one position at a time through `encode`, `init_state` and `step`.

    Returns:
        log_probs (B, T, V), attention weights (B, T, S) and the final decoder state.
    """
    state = model.init_state(model.encode(src, lengths))
    log_probs, weights = [], []
    for t in range(trg_in.size(1)):
        lp, state, w = model.step(state, trg_in[:, t])
        log_probs.append(lp)
        weights.append(w)
    return torch.stack(log_probs, 1), torch.stack(weights, 1), state


def src_trg_batch(src_vocab: int, trg_vocab: int, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """src (3, 7) with lengths 7, 4, 1 and trg_in (3, 5) starting with BOS, with a padded tail.

    Returns:
        src (3, 7) long, PAD after each sentence; lengths (3,) long; trg_in (3, 5) long.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 4, 1])
    src = torch.randint(4, src_vocab, (3, 7), generator=gen)
    src = src.masked_fill(torch.arange(7)[None, :] >= lengths[:, None], PAD_ID)
    trg_in = torch.randint(4, trg_vocab, (3, 5), generator=gen)
    trg_in[:, 0] = BOS_ID
    trg_in[2, 3:] = PAD_ID
    return src, lengths, trg_in
