"""Hands freed heap memory back to the OS after each batch.

glibc's dynamic mmap threshold keeps a batch's freed temporaries in its arenas, so a
worker's RSS sat on its floor or 19-30 MB above it, idle or not, and dashboards, memory
limits and the soak test's leak bound saw that rather than live memory
(docs/RELIABILITY.md, soak). `malloc_trim(0)` after each batch returns the free pages
(about 1 ms against a batch of seconds): an idle worker's RSS is then its live memory;
under load the next batch fills the heap again. Python has no binding for it, hence
ctypes; libcs without it (musl) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release_free_heap() -> bool:
    """Returns free heap pages to the OS; False where the C library cannot."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
