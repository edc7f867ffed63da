"""celery-batches with one batch in flight at a time.

Stock celery-batches flushes its buffer on every `flush_interval` tick and hands each
flush to the pool. With one GPU thread, flushes taken while a batch runs would queue as
many tiny batches. Here a flush is skipped while a batch runs; the buffer keeps filling
(bounded by the prefetch limit), and the scheduler splits the next flush into GPU
batches. Messages are acked only after the batch function returns, which it does only
once every job in it has a recorded result. The batch function returns the ids of
the jobs it could not finish (e.g. storage down); those messages are rejected with
requeue instead of acked. If it raises, every message is requeued: a job is never
acked without a result.
"""

from __future__ import annotations

import threading
from typing import Any, Collection

from celery_batches import Batches, SimpleRequest, apply_batches_task


class GpuBatches(Batches):
    def __init__(self) -> None:
        super().__init__()
        self._inflight = threading.Event()

    def _do_flush(self) -> None:
        if self._inflight.is_set():
            return
        super()._do_flush()

    def flush(self, requests: Collection[Any]) -> Any:
        self._inflight.set()
        simple = ([SimpleRequest.from_request(r) for r in requests],)

        def on_return(unfinished: Any) -> None:
            try:
                for req in requests:
                    if unfinished is None or req.id in unfinished:
                        req.reject(requeue=True)
                    else:
                        req.acknowledge()
            finally:
                self._inflight.clear()

        return self._pool.apply_async(apply_batches_task, (self, simple, 0, None), callback=on_return)
