"""Keeping the resident size of a long streamed run at what it needs now, not what it once needed.

glibc serves allocations below its mmap threshold (dynamic, up to 32 MiB) from heaps it rarely gives back, so
a run that frees and reallocates a block's tensors 32 times creeps upward (+30-40 MiB per 7B block, measured
here) and a one-off peak (tokenizing a 10 MB text takes ~1.2 GB inside the tokenizer) stays resident. Both
helpers are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

#: mallopt parameter M_MMAP_THRESHOLD: allocations from this size on get their own mapping, returned on free.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


def _libc():
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def release_free_memory() -> None:
    """Give memory the process has freed back to the system (after a one-off peak)."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):  # not glibc
            libc.malloc_trim(0)


def bound_heap_growth() -> None:
    """Serve every allocation of 1 MiB or more from its own mapping, so freeing a block's tensors shrinks the
    process at once (the streamed engine calls this before its first block)."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
