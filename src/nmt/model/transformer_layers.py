"""Transformer building blocks: positions, multi-head attention, pre-norm encoder/decoder layers.

Pre-norm (Xiong et al., 2020): every sublayer reads LayerNorm(x) and adds its dropped-out output
to the residual stream x, so the stack needs a final LayerNorm (in `nmt.model.transformer`).
Keys and values are projected apart from the attention itself (`MultiHeadAttention.project_kv`),
so the decoder can cache them: the encoder's per layer once per sentence, its own per position.
Attention runs PyTorch's fused `scaled_dot_product_attention` wherever its weights are not
needed (all self-attention; cross-attention in teacher-forced training), and the explicit
softmax where the search wants the weights back (cross-attention during decoding). Dropout on
the attention weights (`attention_dropout`) and on the feed-forward's inner activations
(`activation_dropout`) is 0 by default, as in fairseq: on CPU a dropout mask costs about as much
as a matrix product of the same size, and without attention dropout the fused kernel applies
(3x256 training 1,650 -> 1,957 target tokens/s on a 2-core EPYC, reports/history.md).
Shapes: B batch, S source length, T target positions, D d_model, h heads, d = D / h.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PositionKind = Literal["sinusoidal", "learned"]


def sinusoids(positions: Tensor, dim: int) -> Tensor:
    """Sinusoidal encodings (Vaswani et al., 2017, 3.5): positions (T,) -> (T, dim), fp32.

    Channel 2i is sin(p / 10000^(2i/dim)), channel 2i + 1 the cos of the same angle.
    """
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)
                         * (-math.log(10000.0) / dim))  # (dim / 2,)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, dim / 2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (T, dim)


class Positions(nn.Module):
    """Position encodings for positions start .. start + length - 1."""

    def __init__(self, *, kind: PositionKind, d_model: int, max_positions: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.max_positions = max_positions
        self.table = nn.Embedding(max_positions, d_model) if kind == "learned" else None
        # sinusoids of positions 0 .. max_positions - 1, computed once (not saved with the
        # weights): decoding asks for one position per step, and computing it (arange, exp,
        # sin, cos, ...) costs about 25 us, 2% of a one-sentence beam step
        self.register_buffer("sinusoid_table", sinusoids(torch.arange(max_positions), d_model)
                             if self.table is None else None, persistent=False)
        self.sinusoid_table: Tensor | None

    def forward(self, start: int, length: int, like: Tensor) -> Tensor:
        """(length, D) encodings in `like`'s dtype and device."""
        if self.table is None:
            table = self.sinusoid_table
            if (table is not None and not torch.compiler.is_compiling()
                    and start + length <= table.size(0)):
                return table[start:start + length].to(like.dtype)  # the same values, bit for bit
            pos = torch.arange(start, start + length, device=like.device)
            return sinusoids(pos, self.d_model).to(like.dtype)
        if not torch.compiler.is_compiling() and start + length > self.max_positions:
            raise ValueError(f"position {start + length - 1}: beyond the learned table of "
                             f"model.transformer.max_positions={self.max_positions}; shorten the "
                             "input or retrain with a larger table")
        return self.table(torch.arange(start, start + length, device=like.device))


def fused_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None,
                    dropout_p: float) -> Tensor:
    """PyTorch's fused `scaled_dot_product_attention`; in fp32 when training in bf16 on CPU.

    Under bf16 autocast on CPU the fused kernel's backward is about 4x slower in bf16 than in fp32
    (torch 2.13 on an AVX-512 bf16 EPYC: forward + backward of a 224 x 4 heads x 14 x 64 batch
    42 vs 10 ms; bench/train_throughput.py: see reports/bench/), so where gradients flow the
    attention itself runs in fp32 and its output goes back to bf16; the projections around it
    stay bf16. Inference (no grad) and other devices call the kernel as it is.
    """
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back to bf16
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                  attn_mask=allowed, dropout_p=dropout_p
                                                  ).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)


def dropout_module(p: float) -> nn.Module:
    """`nn.Dropout(p)`, or `nn.Identity` for p = 0: the same result without a call into ATen at
    every use (nine per decoding step; the default profile trains without dropout)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over h heads, with separately callable key/value projection."""

    def __init__(self, *, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.d_head = heads, d_model // heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout_p = dropout  # on the attention weights

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Memory x (B, S, D) -> keys (B, S, D) and values (B, S, D), heads not split yet."""
        return self.key(x), self.value(x)

    def forward(self, x: Tensor, keys: Tensor, values: Tensor, allowed: Tensor | None,
                need_weights: bool = True) -> tuple[Tensor, Tensor | None]:
        """Attend from queries x (B, T, D) over keys/values (B, S, D).

        Args:
            allowed: (B or 1, T or 1, S) bool, True where query t may attend to position s
                (every query must be allowed at least one position); None: every position.
            need_weights: return the weights (explicit softmax); False runs the fused kernel.
        Returns:
            output (B, T, D) and the weights averaged over heads (B, T, S) (0 where not
            allowed), or None without `need_weights`.
        """
        batch, steps, width = x.shape
        q = self._split(self.query(x))  # (B, h, T, d)
        k, v = self._split(keys), self._split(values)  # (B, h, S, d)
        dropout_p = self.dropout_p if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)  # (B, h, T, S)
            if allowed is not None:
                scores = scores.masked_fill(~allowed[:, None], float("-inf"))
            probs = scores.softmax(dim=-1)
            context = F.dropout(probs, dropout_p, self.training) @ v  # (B, h, T, d)
            weights: Tensor | None = probs.mean(dim=1)
        else:
            context = fused_attention(q, k, v, None if allowed is None else allowed[:, None],
                                      dropout_p)  # (B, h, T, d)
            weights = None
        out = self.out(context.transpose(1, 2).reshape(batch, steps, width))  # (B, T, D)
        return out, weights

    def _split(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, h, T, d)."""
        return x.view(x.size(0), x.size(1), self.heads, self.d_head).transpose(1, 2)


class FeedForward(nn.Module):
    """Position-wise Linear(D, F) -> ReLU -> dropout (`activation_dropout`) -> Linear(F, D)."""

    def __init__(self, *, d_model: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.inner = nn.Linear(d_model, ff_dim)
        self.outer = nn.Linear(ff_dim, d_model)
        self.dropout = dropout_module(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return self.outer(self.dropout(torch.relu(self.inner(x))))


class EncoderLayer(nn.Module):
    """Pre-norm self-attention then feed-forward, each added to the residual stream."""

    def __init__(self, *, d_model: int, heads: int, ff_dim: int, dropout: float,
                 attention_dropout: float = 0.0, activation_dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model=d_model, heads=heads,
                                            dropout=attention_dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model=d_model, ff_dim=ff_dim, dropout=activation_dropout)
        self.dropout = dropout_module(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """x (B, S, D), allowed (B, 1, S) True on real source tokens -> (B, S, D)."""
        h = self.norm_self(x)
        out, _ = self.self_attn(h, *self.self_attn.project_kv(h), allowed, need_weights=False)
        x = x + self.dropout(out)
        return x + self.dropout(self.ff(self.norm_ff(x)))


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention, feed-forward."""

    def __init__(self, *, d_model: int, heads: int, ff_dim: int, dropout: float,
                 attention_dropout: float = 0.0, activation_dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model=d_model, heads=heads,
                                            dropout=attention_dropout)
        self.norm_cross = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model=d_model, heads=heads,
                                             dropout=attention_dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model=d_model, ff_dim=ff_dim, dropout=activation_dropout)
        self.dropout = dropout_module(dropout)

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor, cross_k: Tensor,
                cross_v: Tensor, src_allowed: Tensor,
                need_weights: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """T new positions after T0 cached ones.

        Args:
            x: residual stream of the new positions (B, T, D).
            past_k, past_v: this layer's self-attention keys/values of earlier positions
                (B, T0, D); T0 = 0 for teacher forcing.
            cross_k, cross_v: this layer's projections of the encoder output (B, S, D).
            src_allowed: (B, 1, S) True on real source tokens.
            need_weights: compute the cross-attention weights (False: fused kernel, None).
        Returns:
            x (B, T, D), the keys and values of the new positions (B, T, D) each, and the
            cross-attention weights (B, T, S) or None.
        """
        past, steps = past_k.size(1), x.size(1)
        h = self.norm_self(x)
        new_k, new_v = self.self_attn.project_kv(h)  # (B, T, D)
        keys, values = torch.cat([past_k, new_k], dim=1), torch.cat([past_v, new_v], dim=1)
        query_pos = torch.arange(steps, device=x.device)[:, None] + past  # (T, 1)
        causal = torch.arange(past + steps, device=x.device)[None, :] <= query_pos  # (T, T0+T)
        x, weights = self._attend(x, h, keys, values, causal[None], cross_k, cross_v,
                                  src_allowed, need_weights)
        return x, new_k, new_v, weights

    def step(self, x: Tensor, cache_k: Tensor, cache_v: Tensor, cross_k: Tensor,
             cross_v: Tensor, src_allowed: Tensor,
             need_weights: bool = True) -> tuple[Tensor, Tensor | None]:
        """One new position after T0 cached ones (incremental decoding), as `forward` with T = 1.

        cache_k, cache_v: (B, T0 + 1, D) this layer's self-attention keys/values, the last
            position still to fill: its key and value are written there, in place. The new
            position may attend to every cached one, so no causal mask is built (the kernel
            gives the same result as with an all-True mask).
        Returns x (B, 1, D) and the cross-attention weights (B, 1, S) or None.
        """
        h = self.norm_self(x)
        new_k, new_v = self.self_attn.project_kv(h)  # (B, 1, D)
        cache_k[:, -1], cache_v[:, -1] = new_k[:, 0], new_v[:, 0]
        return self._attend(x, h, cache_k, cache_v, None, cross_k, cross_v, src_allowed,
                            need_weights)

    def _attend(self, x: Tensor, h: Tensor, keys: Tensor, values: Tensor,
                self_allowed: Tensor | None, cross_k: Tensor, cross_v: Tensor,
                src_allowed: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Self-attention of h = norm(x) over keys/values, cross-attention, feed-forward.

        x (B, T, D) with cross_k, cross_v (E, S, D) and src_allowed (E, 1, S), where the B rows
        share the E encoder entries in groups of B / E consecutive rows (E = B: one each; a
        group of K beam hypotheses with T = 1 attends as K queries of its one entry).
        """
        out, _ = self.self_attn(h, keys, values, self_allowed, need_weights=False)
        x = x + self.dropout(out)
        rows, steps, width = x.shape
        queries = self.norm_cross(x).reshape(cross_k.size(0), -1, width)  # (E, B / E * T, D)
        out, weights = self.cross_attn(queries, cross_k, cross_v, src_allowed, need_weights)
        x = x + self.dropout(out.reshape(rows, steps, width))
        if weights is not None:
            weights = weights.reshape(rows, steps, -1)
        return x + self.dropout(self.ff(self.norm_ff(x))), weights
