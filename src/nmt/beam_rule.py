"""The one rule for a beam width and an n-best size (standard library only: shipped with exports).

`nmt.config` checks params and CLI flags with it (upper bound `MAX_BEAM_SIZE`), the search checks
its arguments with it (no upper bound: any width works there), serving with its own lower bound.
"""

from __future__ import annotations

# Widest beam the config and `nmt translate --beam` accept. A beam step holds a few score
# tensors of batch x K x V floats: at evaluate.search.batch_size 128 and V = 8,000 that is
# 262 MB each at K = 64 (already well past where a wider beam stops helping), 614 MB at 150.
# The search itself works for any K (see nmt.model.search); REST requests have their own,
# lower limit (nmt.serving.MAX_BEAM).
MAX_BEAM_SIZE = 64


def beam_problem(beam_size: int, nbest: int,
                 max_beam: int | None = MAX_BEAM_SIZE) -> tuple[str, str] | None:
    """What is wrong with a beam width and an n-best size, or None when both are fine.

    1 <= beam_size <= max_beam (None: no upper bound) and 1 <= nbest <= beam_size. Returns
    ("beam_size" or "nbest", what is wrong) for the first broken bound; the caller names the key
    its user wrote (a params key, a CLI flag, a request parameter).
    """
    if beam_size < 1 or (max_beam is not None and beam_size > max_beam):
        allowed = "must be >= 1" if max_beam is None else f"must be in [1, {max_beam}]"
        return "beam_size", f"{allowed}, got {beam_size}"
    if not 1 <= nbest <= beam_size:
        return "nbest", f"must be in [1, beam_size={beam_size}], got {nbest}"
    return None
