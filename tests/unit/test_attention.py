"""Attention mechanisms: masking, normalisation, shapes, construction errors."""

from __future__ import annotations

import pytest
import torch

from nmt.model.attention import build_attention

KINDS = ["bahdanau", "luong_dot", "luong_general"]
B, T, S, H = 3, 4, 6, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(B, T, H, generator=gen)
    values = torch.randn(B, S, H, generator=gen)
    lengths = torch.tensor([6, 3, 1])
    mask = torch.arange(S)[None, :] < lengths[:, None]
    return query, values, mask


@pytest.mark.parametrize("kind", KINDS)
def test_weights_zero_on_padding_and_rows_sum_to_one(kind: str) -> None:
    torch.manual_seed(0)
    attn = build_attention(kind, H, H)
    query, values, mask = _inputs()
    context, weights = attn(query, attn.precompute_keys(values), values, mask)
    assert context.shape == (B, T, H)
    assert weights.shape == (B, T, S)
    assert torch.all(weights.masked_select(~mask[:, None, :].expand_as(weights)) == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, T))
    torch.testing.assert_close(context, weights @ values)
    assert torch.all(weights[2, :, 0] == 1)  # a single real token takes all the weight


@pytest.mark.parametrize("kind", KINDS)
def test_padding_content_does_not_change_context(kind: str) -> None:
    torch.manual_seed(0)
    attn = build_attention(kind, H, H)
    query, values, mask = _inputs()
    noisy = values.masked_fill(~mask[:, :, None], 1e3)
    ctx_a, w_a = attn(query, attn.precompute_keys(values), values, mask)
    ctx_b, w_b = attn(query, attn.precompute_keys(noisy), noisy, mask)
    torch.testing.assert_close(w_a, w_b)
    torch.testing.assert_close(ctx_a, ctx_b)


def test_general_and_bahdanau_accept_different_query_and_value_sizes() -> None:
    query, values, mask = _inputs()
    for kind in ("bahdanau", "luong_general"):
        attn = build_attention(kind, 5, H)
        context, weights = attn(query[..., :5], attn.precompute_keys(values), values, mask)
        assert context.shape == (B, T, H) and weights.shape == (B, T, S)


def test_shape_error_names_argument() -> None:
    attn = build_attention("luong_general", H, H)
    query, values, mask = _inputs()
    keys = attn.precompute_keys(values)
    with pytest.raises(ValueError, match=r"src_mask: expected shape \(B=3, S=6\), got \(3, 5\)"):
        attn(query, keys, values, mask[:, :5])
    with pytest.raises(ValueError, match="query: expected shape"):
        attn(query[0], keys, values, mask)


def test_build_attention_choices() -> None:
    assert build_attention("none", H, H) is None
    with pytest.raises(ValueError, match="luong_dot needs"):
        build_attention("luong_dot", H, 2 * H)
    with pytest.raises(ValueError, match="must be one of"):
        build_attention("dot", H, H)  # type: ignore[arg-type]
