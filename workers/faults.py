"""Fault injection for the fault tests; inert unless a TTSPOOL_FAULT_* variable is set.

These are test hooks, not features: they let tests/test_faults.py put real faults into
a real worker process at a chosen point of a GPU batch.
- TTSPOOL_FAULT_CRASH_ON_TEXT=<substring>: the worker process dies (os._exit, like a
  segfault or the kernel's OOM killer) inside any GPU batch holding a job whose
  normalized text contains the substring.
- TTSPOOL_FAULT_OOM_ABOVE=<K>: a GPU batch of more than K rows raises
  torch.cuda.OutOfMemoryError, as a too-large batch does on a real GPU.
- TTSPOOL_FAULT_OOM_ON_TEXT=<substring>: any GPU batch holding such a job raises
  torch.cuda.OutOfMemoryError, even alone (a job too large for the GPU).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

log = logging.getLogger(__name__)

CRASH_EXIT_CODE = 86


def inject(texts: Sequence[str]) -> None:
    """Called by the engine at the start of every GPU batch."""
    env = os.environ
    crash = env.get("TTSPOOL_FAULT_CRASH_ON_TEXT")
    if crash and any(crash in t for t in texts):
        log.error("fault injection: crashing the worker process inside a batch of %d", len(texts))
        logging.shutdown()
        os._exit(CRASH_EXIT_CODE)
    above = env.get("TTSPOOL_FAULT_OOM_ABOVE")
    if above and len(texts) > int(above):
        raise torch.cuda.OutOfMemoryError(f"injected: batch of {len(texts)} rows is above {above}")
    oom = env.get("TTSPOOL_FAULT_OOM_ON_TEXT")
    if oom and any(oom in t for t in texts):
        raise torch.cuda.OutOfMemoryError("injected: this job does not fit in GPU memory")
