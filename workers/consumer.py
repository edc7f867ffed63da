"""Celery's consumer, plus a recorded FAILURE for messages it cannot decode.

Celery logs and drops a message it cannot decode or will not accept (a pickle body
when only JSON is accepted, malformed JSON); without this the job would stay PENDING
forever for its producer.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from tasks.errors import MessageRejected


class Consumer(CeleryConsumer):
    def _record_rejection(self, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id = headers.get("id")
        if isinstance(task_id, str) and task_id:
            reason = MessageRejected(
                f"message rejected ({type(exc).__name__}: {str(exc)[:200]!r}, content type "
                f"{message.content_type!r}): ttspool accepts JSON protocol-2 task messages only"
            )
            self.app.backend.mark_as_failure(task_id, reason)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        super().on_decode_error(message, exc)
        self._record_rejection(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        super().on_invalid_task(body, message, exc)
        self._record_rejection(message, exc)
