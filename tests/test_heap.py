"""The worker hands freed heap pages back after each batch (workers.heap)."""

from __future__ import annotations

import re
from pathlib import Path

from workers.heap import release_free_heap


def _rss_mb() -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert match is not None
    return int(match.group(1)) / 1024


def test_release_free_heap_returns_freed_blocks_to_the_os() -> None:
    # 64 KB blocks sit below glibc's mmap threshold, so they come from the heap; the last
    # one stays alive, so the freed pages below it are not given back by free() itself.
    blocks = [bytearray(64 * 1024) for _ in range(3200)]
    pinned = blocks[-1]
    del blocks
    held = _rss_mb()
    assert release_free_heap()
    assert held - _rss_mb() > 100, "200 MB of freed blocks stayed resident"
    assert len(pinned) == 64 * 1024
