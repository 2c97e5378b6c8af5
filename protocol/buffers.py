"""How a process keeps its message buffers: glibc allocator settings, set once.

Not about the wire format, but about moving frames without page faults, so
both sides of the layout (ps/ and worker/) use it and it lives with the
codec. Pure ctypes: no sockets, no threads. Without it, every 16 MiB frame
ZeroMQ receives is a fresh mmap that faults in 4,096 pages and is unmapped
again when freed, which halves large-message throughput.
"""
from __future__ import annotations

import ctypes

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Buffers up to this size come from the heap (and are reused) rather than a
# fresh mmap each; 32 MiB is the most glibc accepts on 64-bit, and covers
# frames of the default 4 MiB partition with room to spare.
MALLOC_MMAP_THRESHOLD_BYTES = 32 * 1024**2
# Free memory a process keeps at the top of its heap instead of returning it
# to the kernel: the receive buffers of the largest message it keeps seeing.
MALLOC_TRIM_THRESHOLD_BYTES = 256 * 1024**2
_allocator_tuned: bool | None = None


def keep_freed_buffers() -> bool:
    """Make glibc keep and reuse freed message buffers; True if it could.

    Idempotent and process-wide; call it before the first ZeroMQ socket so
    the I/O thread shares the main heap (one arena: a buffer the I/O thread
    allocates and the main thread frees goes back where the next one comes
    from, and a message of more than 64 MiB does not get a thread heap of
    its own that glibc unmaps once it is free). The process keeps up to
    MALLOC_TRIM_THRESHOLD_BYTES of freed memory instead of returning it.
    A no-op returning False where the C library has no mallopt.
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        try:
            mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
        except (OSError, AttributeError):
            return False
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)
                                and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES)
                                and mallopt(_M_ARENA_MAX, 1))
    return _allocator_tuned
