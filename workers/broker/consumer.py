"""Celery's consumer, plus a recorded FAILURE for messages it cannot decode.

The transport (workers/broker/transport.py) refuses what breaks the envelope contract before
Celery sees it; what Celery still refuses (a body its serializer cannot load, a request
it cannot build) is recorded the same way (workers/pipeline/rejections.py). Without this the job
would stay PENDING forever for its producer.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from tasks.envelope import Rejection
from tasks.schema import NAME

from workers.pipeline.rejections import Rejections


class Consumer(CeleryConsumer):
    rejections: Rejections  # set by consumer_for
    def _record_rejection(self, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id = headers.get("id")
        detail = (f"message rejected ({type(exc).__name__}: {str(exc)[:200]!r}, content type "
                  f"{message.content_type!r}): ttspool accepts JSON protocol-2 task messages only")
        job_id = task_id if isinstance(task_id, str) and NAME.fullmatch(task_id) else None
        self.rejections.record(Rejection("celery", detail, job_id), getattr(message, "body", None))

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        super().on_decode_error(message, exc)
        self._record_rejection(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        super().on_invalid_task(body, message, exc)
        self._record_rejection(message, exc)


def consumer_for(rejections: Rejections) -> type[Consumer]:
    """This worker's consumer class (Celery takes a class, `worker_consumer`), recording
    refusals with `rejections`."""
    return type("Consumer", (Consumer,), {"rejections": rejections})
