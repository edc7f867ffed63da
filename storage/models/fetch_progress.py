"""Fetch progress: a rich progress bar on a terminal, plain log lines otherwise, and a counter."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from prometheus_client import Counter

log = logging.getLogger("ttspool.fetch")

# On no registry of its own: the worker registers it on the one its /metrics serves.
FETCH_BYTES = Counter("ttspool_model_fetch_bytes", "Model file bytes fetched, by source kind", ["source"],
                      registry=None)
_LOG_EVERY_S = 5.0
MiB = 1024 * 1024


class FetchProgress:
    def __init__(self, source_kind: str, total: int | None, tty: bool | None = None) -> None:
        self._counter = FETCH_BYTES.labels(source=source_kind)
        self._lock = threading.Lock()
        self._done = 0
        self._total = total
        self._t0 = self._last_log = time.monotonic()
        self._bar: Any = None
        if sys.stderr.isatty() if tty is None else tty:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
            self._task = self._bar.add_task("model", total=total)
            self._bar.start()

    def start_file(self, rel: str, size: int | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=rel)
        else:
            log.info("fetching %s%s", rel, "" if size is None else f" ({size / MiB:.1f} MiB)")

    def skip(self, size: int | None) -> None:
        """A file already in the cache: progress moves, nothing was fetched."""
        self._move(size or 0)

    def advance(self, n: int) -> None:
        self._counter.inc(n)
        self._move(n)

    def _move(self, n: int) -> None:
        with self._lock:
            self._done += n
            done, now = self._done, time.monotonic()
            due = now - self._last_log >= _LOG_EVERY_S
            if due:
                self._last_log = now
        if self._bar is not None:
            self._bar.update(self._task, completed=done)
        elif due:
            total = f"/{self._total / MiB:.1f}" if self._total else ""
            log.info("%.1f%s MiB, %.1f MiB/s", done / MiB, total, done / MiB / max(now - self._t0, 1e-9))

    def verified(self, rel: str) -> None:
        if self._bar is None:
            log.info("verified %s", rel)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
