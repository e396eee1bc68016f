"""Shape and dtype checks of the model package (`nmt.model.shapes`)."""

from __future__ import annotations

import pytest
import torch

from nmt.model import encoder
from nmt.model.shapes import check_dtype, check_shapes


def test_axes_bind_on_first_use_and_errors_name_the_argument() -> None:
    src, lengths = torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    check_shapes(("src", src, "B S"), ("src_lengths", lengths, "B"))
    check_shapes(("src", src, "B 5"), dims={"B": 3})
    with pytest.raises(ValueError, match=r"^src_lengths: expected shape \(B=3\), got \(2,\)$"):
        check_shapes(("src", src, "B S"), ("src_lengths", lengths[:2], "B"))
    with pytest.raises(ValueError, match=r"^src: expected shape \(B, 4\), got \(3, 5\)$"):
        check_shapes(("src", src, "B 4"))
    with pytest.raises(ValueError, match=r"^src: expected shape \(B=2, S\), got \(3, 5\)$"):
        check_shapes(("src", src, "B S"), dims={"B": 2})
    with pytest.raises(ValueError, match=r"^src: expected shape \(B, S, E\), got \(3, 5\)$"):
        check_shapes(("src", src, "B S E"))


def test_dtype_check_and_one_owner() -> None:
    check_dtype("src", torch.zeros(2, dtype=torch.long), torch.long)
    with pytest.raises(ValueError, match=r"^src: expected dtype torch.int64, got torch.float32$"):
        check_dtype("src", torch.zeros(2), torch.long)
    assert not hasattr(encoder, "check_shapes")  # moved here from the encoder module
