"""Process memory on the CPU: freed tensor memory goes back to the system at once.

PyTorch keeps no cache of CPU memory: every tensor comes from ``malloc``. glibc serves large
blocks with their own ``mmap`` (returned to the system on ``free``) but, by default, raises that
threshold to the size of each large block freed, up to 32 MiB: after the first step every
activation under 32 MiB (at 256 px: the 128-channel maps of each block, the 64- and 128-px
states) comes from the heap, whose freed holes stay resident and do not fit the next step's
blocks. On a 256 px xray256 training step that costs about 0.4 GB of peak memory in the first
step and more in later ones (``benchmarks/bench_vae.py --memory``). Fixing the threshold (which
also turns the adjustment off) makes peak RSS follow the tensors alive; the cost is a page fault
per fresh page of those blocks, small beside the convolutions that fill them.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 16  # bytes: blocks of 64 KiB and more get their own mapping


def release_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of ``threshold`` bytes or more with their own mapping (glibc ``mallopt``),
    for the whole process. Returns True when set; False where there is nothing to set (not Linux
    glibc), which changes nothing else. The numbers a program computes do not depend on it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # musl or another C library: no mallopt
        return False
    log.debug("malloc mmap threshold set to %d bytes: %s", threshold, ok)
    return ok
