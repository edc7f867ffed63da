"""Fault injection for the fault tests; inert unless a TTSPOOL_FAULT_* variable is set.

These are test hooks, not features: they let tests/test_faults_*.py put real faults into
a real worker process at a chosen point of a GPU batch. The worker installs them from
outside the engine (`Engine.on_admit`), only when one is set.
- TTSPOOL_FAULT_CRASH_ON_TEXT=<substring>: the worker process dies (os._exit, like a
  segfault or the kernel's OOM killer) inside any GPU batch holding a job whose
  normalized text contains the substring.
- TTSPOOL_FAULT_OOM_ABOVE=<K>: a GPU batch of more than K rows raises
  torch.cuda.OutOfMemoryError, as a too-large batch does on a real GPU.
- TTSPOOL_FAULT_OOM_ON_TEXT=<substring>: any GPU batch holding such a job raises
  torch.cuda.OutOfMemoryError, even alone (a job too large for the GPU).
- TTSPOOL_FAULT_EXIT_AFTER_FETCH=<substring>: the worker process dies right after it
  fetches a queue item containing the substring (a job id), before it delivers it.
- TTSPOOL_FAULT_HANG_ON_TEXT=<substring>: any GPU batch holding such a job hangs (a
  wedged driver call) for an hour, while the rest of the process runs on.
- TTSPOOL_FAULT_LEAK_ON_TEXT=<substring>: each row of such a job, as it joins a batch,
  keeps LEAK_BYTES (200 KB, written so that they are resident) for the life of the
  process: a leak, which tests/test_leak.py must see. Large enough that 200 jobs leak
  four times what the idle RSS of a clean run moves by (up to 9 MB on an AMD EPYC host,
  whose allocator still settles over the first thousand jobs).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

CRASH_EXIT_CODE = 86
KNOWN = frozenset({"CRASH_ON_TEXT", "OOM_ABOVE", "OOM_ON_TEXT", "HANG_ON_TEXT", "EXIT_AFTER_FETCH", "LEAK_ON_TEXT"})
LEAK_BYTES = 200 * 1024
_leaked: list[bytes] = []


def hook(faults: Sequence[tuple[str, str]]) -> Callable[[Sequence[str], Sequence[str]], None] | None:
    """A check to run as rows join a batch, with the texts of the rows running and of
    those joining, or None when no fault is set (Settings.faults: TTSPOOL_FAULT_<NAME> as
    (NAME, value))."""
    if not faults:
        return None
    conf = dict(faults)
    unknown = set(conf) - KNOWN
    if unknown:
        raise ValueError(f"unknown fault(s) {sorted(unknown)}: TTSPOOL_FAULT_ takes {sorted(KNOWN)}")
    crash, oom, hang = conf.get("CRASH_ON_TEXT"), conf.get("OOM_ON_TEXT"), conf.get("HANG_ON_TEXT")
    above = int(conf["OOM_ABOVE"]) if "OOM_ABOVE" in conf else None
    leak = conf.get("LEAK_ON_TEXT")

    def inject(running: Sequence[str], new: Sequence[str]) -> None:
        texts = [*running, *new]
        if leak:
            _leaked.extend(b"\x01" * LEAK_BYTES for t in new if leak in t)
        if crash and any(crash in t for t in texts):
            log.error("fault injection: crashing the worker process inside a batch of %d", len(texts))
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)
        if hang and any(hang in t for t in texts):
            log.error("fault injection: hanging inside a batch of %d", len(texts))
            time.sleep(3600)
        if above is not None and len(texts) > above:
            raise torch.cuda.OutOfMemoryError(f"injected: batch of {len(texts)} rows is above {above}")
        if oom and any(oom in t for t in texts):
            raise torch.cuda.OutOfMemoryError("injected: this job does not fit in GPU memory")

    return inject


def fetch_hook(faults: Sequence[tuple[str, str]]) -> Callable[[bytes], None] | None:
    """A check for every item the transport fetches, or None when that fault is not set."""
    needle = dict(faults).get("EXIT_AFTER_FETCH")
    if not needle:
        return None
    marker = needle.encode()

    def inject(item: bytes) -> None:
        if marker in item:
            log.error("fault injection: exiting right after fetching a queue item")
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)

    return inject
