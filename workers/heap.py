"""Hands freed heap memory back to the OS after each batch.

glibc keeps the pages of freed blocks inside its arenas, so a worker's RSS stepped up and
down by about 19 MB with the batch buffers it had last freed (docs/RELIABILITY.md, soak),
and dashboards, memory limits and the soak test's leak bound saw that, not live memory.
`malloc_trim(0)` returns the free pages (a few ms against a batch of seconds). Python has
no binding for it, hence ctypes; libcs without it (musl) are left as they are.
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
