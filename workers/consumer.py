"""Celery's consumer, plus a recorded FAILURE for messages it cannot decode.

Celery logs and acks an undecodable message (a pickle body when only JSON is accepted,
malformed JSON); without this the job would stay PENDING forever for its producer.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from tasks.errors import MessageRejected


class Consumer(CeleryConsumer):
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id = headers.get("id")
        super().on_decode_error(message, exc)
        if isinstance(task_id, str) and task_id:
            reason = MessageRejected(
                f"message body could not be decoded (content type {message.content_type!r}); "
                "ttspool accepts JSON messages only"
            )
            self.app.backend.mark_as_failure(task_id, reason)
