"""Keep freed host memory in glibc's heap instead of returning it to the kernel.

glibc serves allocations above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps
them when freed, so every large tensor a step creates (the gathered K/V of a batch-64 decode,
the activations of a 4,096-token prefill) is page-faulted in again, 4 KiB at a time, and zeroed
by the kernel. On a 2-core machine that was 60% of the attention time of a batch-64 decode step
and a third of a long prefill. With mmap off for malloc and a high trim threshold, freed blocks
stay in the heap and the next step reuses them: what jemalloc or tcmalloc (the allocators CPU
inference stacks preload) do by default. The price is that the process keeps its peak heap.

TEXTGEN_CPU_MALLOC_TUNING=0 leaves glibc's defaults; with another allocator preloaded
(LD_PRELOAD=libjemalloc.so) glibc's settings do not matter and the call is harmless.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> str:
    """Apply the tuning once per process; returns what was done, for the startup line."""
    if os.environ.get("TEXTGEN_CPU_MALLOC_TUNING", "1") == "0":
        return "glibc malloc defaults (TEXTGEN_CPU_MALLOC_TUNING=0)"
    libc = _glibc()
    if libc is None:
        return "allocator not tuned (not glibc)"
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "allocator not tuned (mallopt refused)"
    return "malloc keeps freed memory"


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
