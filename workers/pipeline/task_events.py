"""Celery task events for ttspool's batched jobs.

Celery's own strategy and Request send task-received, -started, -succeeded and -failed
for a plain task; celery-batches (0.11) sends none for the requests it buffers, so
Flower, celery-exporter and `celery events` would never see a ttspool job. The batch
runner sends them here, with the fields Celery's own events carry. Whether they go out
at all is the worker's `worker_send_task_events` (TTSPOOL_TASK_EVENTS): the consumer's
dispatcher drops task events when it is off.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from celery.utils.saferepr import saferepr

from tasks.settings import TASK_NAME

log = logging.getLogger(__name__)

# Celery's default for argsrepr, kwargsrepr and the result repr (resultrepr_maxsize).
MAX_REPR = 1024


class TaskEvents:
    def __init__(self, send: Callable[..., None] | None = None) -> None:
        self.send = send or (lambda event_type, **fields: None)
        # Rows are recorded on several store threads; Celery's event dispatcher buffers
        # task events in lists it does not guard.
        self._lock = threading.Lock()

    def _emit(self, event_type: str, **fields: Any) -> None:
        try:
            with self._lock:
                self.send(event_type, **fields)
        except Exception as err:  # noqa: BLE001 - events are for watching: a job never fails for one
            log.warning("could not send %s for job %s: %s", event_type, fields.get("uuid"), err)

    def received(self, job_id: str, kwargs: Any) -> None:
        self._emit("task-received", uuid=job_id, name=TASK_NAME, args="()", kwargs=saferepr(kwargs, MAX_REPR),
                   root_id=job_id, parent_id=None, retries=0, eta=None, expires=None)

    def started(self, job_id: str) -> None:
        self._emit("task-started", uuid=job_id)

    def succeeded(self, job_id: str, result: Any, runtime: float) -> None:
        self._emit("task-succeeded", uuid=job_id, result=saferepr(result, MAX_REPR), runtime=runtime)

    def failed(self, job_id: str, exc: BaseException) -> None:
        self._emit("task-failed", uuid=job_id, exception=saferepr(exc, MAX_REPR), traceback="")

    def requeued(self, job_id: str) -> None:
        # Back in the queue (its upload failed, or the worker is shutting down): Celery's
        # name for a task that will run again is "retried".
        self._emit("task-retried", uuid=job_id, exception="requeued: it will run again", traceback="")
