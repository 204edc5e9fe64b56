"""Process-wide memory allocator settings for the command-line entry points.

PyTorch's CPU tensors come straight from the C library's `malloc`. glibc serves every block over 32 MB (and,
by default, over its adaptive threshold) with a fresh `mmap` and gives it back at `free`, so each large activation
of a CPU forward lands on new pages that the kernel must zero: a B/16 forward at batch 16 took 265,000 page faults,
about 1 GB of zeroing, and GELU on a fresh (3136, 3072) output ran at half the speed of one written into reused
memory (measured in bench/RESULTS.md). Serving large blocks from the heap and keeping freed memory there lets the
next batch reuse the same pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep large blocks in its heap and freed memory in the process: no `mmap`, and the heap's
    top given back to the system only once over 1 GiB of it is free.

    Process-wide and permanent: only the `siglip` commands call it, never the library functions. The resident size
    stays at its peak instead of shrinking between batches. Returns False, changing nothing, where the C library is
    not glibc (macOS, musl) or refuses.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))
