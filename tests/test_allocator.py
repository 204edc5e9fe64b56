"""`keep_freed_memory`: large blocks come back from the heap instead of fresh pages the kernel must zero."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Allocates, touches and frees 64 MB twice in a fresh process, and prints the page faults of the second round.
PROGRAM = """
import ctypes, resource, sys
from siglip_cli.allocator import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 64 << 20
for round in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and its page-fault counters: Linux")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    faults = {}
    for mode in ("off", "on"):
        done = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        faults[mode] = int(done.stdout)
    pages = (64 << 20) // 4096
    assert faults["off"] >= pages // 2  # glibc's default: a fresh mapping, every page zeroed again
    assert faults["on"] < pages // 20  # kept in the heap: the same pages, already there
