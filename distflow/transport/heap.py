"""Keep large receive buffers on glibc's heap, where freed blocks are reused.

libzmq receives every message into a fresh ``malloc`` of the message's size, in its I/O
thread. glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and a thread's own arena even earlier, so every large message costs a new
mapping and one page fault per 4 KiB page as the kernel fills it: about 18k faults and
half the bandwidth for a 64 MiB tensor (benchmarks/RESULTS.md, data plane).
``keep_large_buffers`` makes the process allocate from the one main heap and never
``mmap`` a block, so the memory of the previous step's tensors is handed out again,
already mapped, like a caching allocator. Freed memory stays resident (up to
``trim_mb`` at the top of the heap) until ``release`` gives it back, which the memory
policy's ``memory.release`` does at phase boundaries.

Must run before the first ZeroMQ socket starts libzmq's I/O thread (a thread keeps the
arena it first allocated from). A no-op returning False off glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            _libc = False
        else:
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            except OSError:
                _libc = False
    return _libc


def keep_large_buffers(trim_mb: int = 1024) -> bool:
    libc = _glibc()
    if not libc:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_MAX, 0)
                and libc.mallopt(_M_TRIM_THRESHOLD, int(trim_mb) << 20))


def release() -> bool:
    """Return free heap memory to the OS (``malloc_trim``); False off glibc."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))
