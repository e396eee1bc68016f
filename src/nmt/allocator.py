"""Keep freed tensor memory inside the process, so big tensors are not page-faulted on every step.

PyTorch's CPU tensors come from the C library's `malloc`. glibc serves a block above its mmap
threshold with a fresh `mmap` and gives it back with `munmap` when it is freed, and trims the
top of its heap back to the OS; the next step's tensors then come back as new pages that the
kernel faults in 4 KiB at a time, zeroing each one. Two policies, set with glibc's `mallopt`:

    decode  blocks up to 32 MiB (glibc's largest mmap threshold) from the heap; the heap is
            trimmed only above 256 MiB free. A beam step's score tensors (640 x 8,000 floats
            = 20 MB at batch 128, beam 5) are reused instead of refaulted: 1.4 M page faults
            and about 10% of beam search time on the test split before. Bounded: a serving
            process keeps at most 256 MiB of freed memory.
    train   every block from the heap, whatever its size, and the heap never trimmed. A
            training step's largest tensors are the logits and their gradient (3,000 target
            tokens x 8,000 pieces x 4 bytes = 96 MB each), above any mmap threshold: with the
            C library's defaults, 3.2 M page faults and 14 s of system CPU time in 25 steps of
            the default Transformer on a 2-core EPYC. Side by side with this policy
            (`bench/train_throughput.py`, reports/bench/): 1.11-1.24x the target tokens/s in
            three runs, peak RSS +115-135 MB. The process keeps its peak memory until it
            exits (fine for a training run, whose peak recurs every step).

The arithmetic is unchanged (same kernels, same 64-byte tensor alignment): the trained weights
are the same bit for bit (tests/unit/test_allocator.py). A process keeps the stronger policy it
was given (`train` after `decode` applies; `decode` after `train` changes nothing).

Only glibc has `mallopt`; elsewhere (musl, macOS, Windows) this does nothing and says so.
`NMT_MALLOC=system` keeps the C library's defaults.

oneDNN, which runs PyTorch's bf16 matrix products on CPU, keeps every primitive it creates (JIT
code and buffers for one operation at one shape) in a cache of 1,024 by default. Length-bucketed
batches give most steps new shapes, so in bf16 training the cache fills for the whole run and the
process grows with it: the train stage peaked at 4.0 GiB in bf16 against 1.72 GB in fp32 (2-core
Zen 4 with avx512_bf16, reports/history.md). `bound_onednn_cache` caps it at 32 primitives for
training (a bare loop of 400 bf16 steps of the default Transformer there: peak RSS 3,237 ->
2,426 MB, 242 -> 227 s), unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is already set. oneDNN reads
the setting when it creates its first primitive, so this must run before any bf16 or oneDNN
work in the process; a primitive created again is the same code, so results are unchanged.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from typing import Literal

log = logging.getLogger(__name__)

ENV = "NMT_MALLOC"  # "system": leave malloc as the C library sets it
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"  # oneDNN's own setting (default 1,024)
TRAIN_ONEDNN_CACHE = 32  # primitives kept while training (see the module docstring)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc <malloc.h>
Policy = Literal["decode", "train"]
SETTINGS: dict[str, tuple[tuple[int, int], ...]] = {
    "decode": ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 256 << 20)),
    "train": ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)),  # no mmap; trim: in effect never
}
RANK = {"decode": 1, "train": 2}
_applied: str | None = None  # the policy in force in this process, if any
_said: set[str] = set()  # reasons already logged


def _skip(reason: str) -> bool:
    if reason not in _said:
        _said.add(reason)
        log.info("%s", reason)
    return False


def keep_freed_memory(policy: Policy = "decode") -> bool:
    """Apply `policy` (see the module docstring) to this process; True if it is in force.

    Idempotent. Returns False, and logs why once, with NMT_MALLOC=system or without glibc.
    """
    global _applied
    if _applied is not None and RANK[_applied] >= RANK[policy]:
        return True
    if os.environ.get(ENV, "").strip().lower() == "system":
        return _skip(f"{ENV}=system: malloc keeps the C library's defaults")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _skip(f"malloc tuning skipped: needs glibc (this is {platform.system()} "
                     f"{platform.libc_ver()[0] or 'without glibc'})")
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return _skip("malloc tuning skipped: mallopt not found in the C library")
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not all(mallopt(param, value) == 1 for param, value in SETTINGS[policy]):
        return False
    _applied = policy
    return True


def bound_onednn_cache(capacity: int = TRAIN_ONEDNN_CACHE) -> str:
    """Cap oneDNN's primitive cache at `capacity` unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is set.

    Returns the setting in force. Effective only before the process's first oneDNN primitive
    (oneDNN reads it once); the train stage calls it before building anything.
    """
    return os.environ.setdefault(ONEDNN_CACHE_ENV, str(capacity))
