"""Attention over encoder outputs: Bahdanau (additive), Luong dot and Luong general.

Every mechanism scores T queries at once, so the same module serves one decoder step (T = 1)
and the whole target sequence of the fast training path. Keys are projected once per batch by
`precompute_keys` and carried in the decoder state. Padding gets weight exactly 0.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from nmt.model.shapes import check_shapes

AttentionKind = Literal["bahdanau", "luong_dot", "luong_general", "none"]


class Attention(nn.Module):
    """Base class: subclasses implement `precompute_keys` and `score`."""

    def precompute_keys(self, values: Tensor) -> Tensor:
        """Keys from encoder outputs (B, S, H_enc) -> (B, S, K); identity by default."""
        return values

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        """Raw scores (B, T, S) for queries (B, T, H_dec) against keys (B, S, K)."""
        raise NotImplementedError

    def forward(self, query: Tensor, keys: Tensor, values: Tensor,
                src_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Attend with T queries at once.

        Args:
            query: decoder states, shape (B, T, H_dec).
            keys: output of `precompute_keys`, shape (B, S, K).
            values: encoder outputs, shape (B, S, H_enc).
            src_mask: True on real source tokens, shape (B, S).
        Returns:
            context (B, T, H_enc) and weights (B, T, S); weights are 0 on padding and each row
            sums to 1 (every sentence has at least one real token).
        """
        check_shapes(("query", query, "B T Q"), ("keys", keys, "B S K"),
                     ("values", values, "B S H"), ("src_mask", src_mask, "B S"))
        scores = self.score(query, keys)  # (B, T, S)
        scores = scores.masked_fill(~src_mask[:, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)  # (B, T, S)
        return torch.bmm(weights, values), weights  # (B, T, H_enc)


class BahdanauAttention(Attention):
    """Additive attention: v^T tanh(W_q q + W_k k) (Bahdanau et al., 2015, appendix A.1.2)."""

    def __init__(self, query_dim: int, value_dim: int, attn_dim: int) -> None:
        super().__init__()
        self.w_q = nn.Linear(query_dim, attn_dim, bias=False)
        self.w_k = nn.Linear(value_dim, attn_dim, bias=True)
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def precompute_keys(self, values: Tensor) -> Tensor:
        return self.w_k(values)  # (B, S, A)

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        hidden = torch.tanh(self.w_q(query)[:, :, None, :] + keys[:, None, :, :])  # (B, T, S, A)
        return self.v(hidden).squeeze(-1)  # (B, T, S)


class LuongDotAttention(Attention):
    """Dot-product attention: q^T k (Luong et al., 2015); needs H_dec == H_enc."""

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        return torch.bmm(query, keys.transpose(1, 2))  # (B, T, S)


class LuongGeneralAttention(LuongDotAttention):
    """Bilinear attention: q^T W_a k (Luong et al., 2015); W_a k is precomputed per batch."""

    def __init__(self, query_dim: int, value_dim: int) -> None:
        super().__init__()
        self.w_a = nn.Linear(value_dim, query_dim, bias=False)

    def precompute_keys(self, values: Tensor) -> Tensor:
        return self.w_a(values)  # (B, S, H_dec)


def build_attention(kind: AttentionKind, query_dim: int, value_dim: int) -> Attention | None:
    """Attention module for `model.attention`; None for `none` (plain encoder-decoder)."""
    if kind == "bahdanau":
        return BahdanauAttention(query_dim, value_dim, attn_dim=query_dim)
    if kind == "luong_dot":
        if query_dim != value_dim:
            raise ValueError(f"luong_dot needs decoder size == encoder output size, "
                             f"got {query_dim} != {value_dim}")
        return LuongDotAttention()
    if kind == "luong_general":
        return LuongGeneralAttention(query_dim, value_dim)
    if kind == "none":
        return None
    raise ValueError(f"attention: must be one of bahdanau, luong_dot, luong_general, none; "
                     f"got {kind!r}")
