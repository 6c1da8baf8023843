"""Keep the memory a CPU training process frees, instead of faulting it back in every step.

glibc gives freed memory back to the kernel: a block above the mmap threshold (128 KiB at
start, raised only as such blocks are freed) is unmapped on free, and the top of the heap is
trimmed once 128 KiB or more of it is free. A training step on the CPU frees its activations
and gradients at its end and allocates the same sizes again in the next step, so every step
page-faults its working set back in, every step (the counts and the speed-up:
benchmarks/RESULTS.md, "Figures behind the code's choices").

Raising both thresholds keeps those pages mapped for the next step. Peak memory does not
grow: the memory kept is what the next step allocates anyway. Only the CPU path calls this;
on a GPU the activations live in CUDA's caching allocator, which already keeps them.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# A mid-size CNN's step has blocks past 32 MiB, which a 32 MiB threshold still faults in every
# step (the counts: benchmarks/RESULTS.md, "Figures behind the code's choices"). 1 GiB, as the
# trim threshold: what is kept is bounded the same way either side. mallopt(3) gives 32 MiB as
# the limit on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), which glibc 2.36 no longer enforces; a glibc
# that refuses gets 32 MiB, and the larger blocks are mapped and unmapped one by one there.
MMAP_THRESHOLD_BYTES = 2**30
MMAP_THRESHOLD_FALLBACK_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 2**30

# glibc's own variables for these settings, and its tunables (any GLIBC_TUNABLES counts, malloc
# ones or not): a user who sets one has chosen how this process runs, and wins.
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds so that freed memory stays with this process.

    Returns whether they were set: not on another C library (musl, macOS) and not where the
    environment already tunes malloc. Processes forked afterwards (DataLoader workers) inherit it.
    """
    if platform.libc_ver()[0] != "glibc" or any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    libc = ctypes.CDLL("libc.so.6")
    # mallopt returns 1 on success; the mmap threshold first, as setting it also fixes glibc's
    # dynamic thresholds (they would otherwise move with each large free).
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) or libc.mallopt(
        M_MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK_BYTES)
    return bool(mmap_set) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
