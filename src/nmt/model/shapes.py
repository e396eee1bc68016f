"""Shape and dtype checks for the model package's entry points (errors name the argument)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_shapes(*specs: tuple[str, Tensor, str], dims: dict[str, int] | None = None) -> None:
    """Check tensor shapes against symbolic specs; raise ValueError naming the argument.

    Each spec is `(name, tensor, "B S")`: axis names bind to sizes on first use (or come from
    `dims`), digits are fixed sizes. Skipped while torch.export / torch.compile traces, so the
    checks add no guards to an exported graph.
    """
    if torch.compiler.is_compiling():
        return
    bound = dict(dims or {})
    for name, tensor, spec in specs:
        axes = spec.split()
        actual = tuple(tensor.shape)
        known = dict(bound)  # sizes fixed by earlier arguments, for the message
        ok = len(axes) == len(actual)
        for axis, size in zip(axes, actual, strict=False) if ok else ():
            want = int(axis) if axis.isdigit() else bound.setdefault(axis, size)
            ok = ok and size == want
        if not ok:
            expected = ", ".join(f"{a}={known[a]}" if a in known else a for a in axes)
            raise ValueError(f"{name}: expected shape ({expected}), got {actual}")


def check_dtype(name: str, tensor: Tensor, dtype: torch.dtype) -> None:
    """Raise ValueError naming the argument when `tensor` does not have `dtype`."""
    if tensor.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {tensor.dtype}")
