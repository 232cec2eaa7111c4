"""Keep freed memory inside the process during CPU runs on Linux (glibc's malloc).

glibc serves every block over 32 MiB (and, until its adaptive threshold has grown, every block over 128 KiB) with
fresh mmap() pages, and unmaps it on free. A CPU training step allocates and frees activations of up to hundreds of
MB (the fast preset: one 2000 x 64 x 32 x 32 bf16 layer output is 262 MB), so with the defaults the kernel
zero-fills and maps these pages again in every step. With malloc's mmap turned off and the heap never trimmed,
freed blocks are reused instead: the process keeps its peak memory and the step runs faster; `cifar bench` times
the preset's step both ways in fresh processes and prints the ratio (`keep_freed_memory_speedup`).
"""

from __future__ import annotations

import ctypes
import platform
import sys
from functools import cache

# mallopt() parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1  # bytes free at the top of the heap before it is given back to the OS
M_MMAP_MAX = -4  # how many blocks may be served by mmap at once; 0 turns mmap off
NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes (2 GiB): more than one step frees at the heap's top


@cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory_supported(device_type: str = "cpu") -> bool:
    """Only tensors on the CPU come from malloc; other devices have allocators of their own."""
    return device_type == "cpu" and _glibc() is not None


def keep_freed_memory(device_type: str = "cpu") -> bool:
    """Make this process reuse the memory it frees rather than hand it back; False (and nothing changed) for
    runs on other devices and where glibc is not the allocator (macOS, musl)."""
    libc = _glibc()
    if libc is None or device_type != "cpu":
        return False
    # mallopt returns 1 on success and 0 for a value it rejects.
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
