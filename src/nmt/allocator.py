"""Keep freed tensor memory inside the process, so a training step does not page-fault its tensors.

PyTorch's CPU tensors come from the C library's `malloc`. glibc serves a block above its mmap
threshold (32 MiB at most) with a fresh `mmap` and gives it back with `munmap` when freed. A
training step's largest tensors are above it (the logits and their gradient: 3,000 target
tokens x 8,000 pieces x 4 bytes = 96 MB each), so every step maps them again and the kernel
faults them in 4 KiB at a time, zeroing each page: on a 2-core EPYC, 3.4 M page faults and 13 s
of system time in 25 steps of the default Transformer.

`keep_freed_memory()` tells glibc (`mallopt`) to serve every block from its heap and never to
trim that heap, so the memory of step k is reused by step k+1. Measured side by side
(`bench/train_throughput.py --malloc both`, reports/bench/): 12-13% more target tokens/s, 150 MB
more peak RSS. The arithmetic is unchanged (same kernels, same 64-byte alignment), so the
trained weights are the same bit for bit.

Only glibc has `mallopt`; elsewhere (musl, macOS, Windows) this does nothing and says so.
`NMT_MALLOC=system` keeps the C library's defaults.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

ENV = "NMT_MALLOC"  # "system": leave malloc as the C library sets it
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
NEVER_TRIM = 2**31 - 1  # bytes of free heap top kept before trimming: in effect never


def keep_freed_memory() -> bool:
    """Serve all blocks from the heap and never trim it (glibc); True if that took effect.

    Call once, early in a long-running training process; later allocations follow the new
    policy. Returns False (and logs why) with NMT_MALLOC=system or a C library without mallopt.
    """
    if os.environ.get(ENV, "").strip().lower() == "system":
        log.info("%s=system: malloc keeps the C library's defaults", ENV)
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.info("malloc tuning skipped: needs glibc (this is %s %s)", platform.system(),
                 platform.libc_ver()[0] or "without glibc")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.info("malloc tuning skipped: mallopt not found in the C library")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
