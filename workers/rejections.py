"""Queue items the worker will not run: taken off the queue, recorded once, counted.

The transport (workers/transport.py) checks every popped item against the envelope
contract (tasks/envelope.py) before kombu or Celery sees it; Celery's own late refusals
(workers/consumer.py) end here too. A refusal names the job it can: a FAILURE with the
reason is recorded under the message's id, unless that id already has a record (it is
somebody else's job: a forged or replayed message must not overwrite it). Everything
else goes to the dead-letter list, bounded, with the first bytes of the item.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

import redis
from celery import Celery

from tasks.envelope import Rejection
from tasks.errors import MessageRejected
from tasks.settings import DEAD_LETTER_KEY
from tasks.states import JobState

log = logging.getLogger(__name__)

# The dead-letter list keeps the newest entries only: a flood of garbage must not fill
# the broker's memory.
DEAD_LETTER_MAX = 10_000
_RAW_BYTES = 2048


class Rejections:
    def __init__(self, app: Celery, r: redis.Redis, count: Callable[[str], None]) -> None:
        self.app = app
        self.redis = r
        self.count = count

    def record(self, rejection: Rejection, raw: bytes | str | None) -> None:
        self.count(rejection.reason)
        log.warning("rejected a queue item (%s): %s", rejection.reason, rejection.detail)
        try:
            if rejection.job_id is not None and self._unrecorded(rejection.job_id):
                self.app.backend.mark_as_failure(rejection.job_id, MessageRejected(rejection.detail))
                return
            text = raw[:_RAW_BYTES].decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
            entry = {"id": rejection.job_id, "reason": f"{rejection.reason}: {rejection.detail}",
                     "raw": text[:_RAW_BYTES], "at": time.time()}
            self.redis.pipeline().lpush(DEAD_LETTER_KEY, json.dumps(entry)).ltrim(
                DEAD_LETTER_KEY, 0, DEAD_LETTER_MAX - 1).execute()
        except redis.RedisError as err:
            # The item is gone from the queue either way: refusing it must not stop the worker.
            log.error("could not record the rejected item (%s): %s", rejection.reason, err)

    def _unrecorded(self, job_id: str) -> bool:
        return self.app.backend.get_task_meta(job_id).get("status", JobState.PENDING) == JobState.PENDING


_current: Rejections | None = None
_lock = threading.Lock()


def install(rejections: Rejections) -> None:
    """The worker's recorder: the transport and consumer are built by kombu and Celery,
    which take classes, not objects, so they find it here."""
    global _current
    with _lock:
        _current = rejections


def record(rejection: Rejection, raw: Any) -> None:
    current = _current
    if current is None:
        log.warning("rejected a queue item (%s): %s", rejection.reason, rejection.detail)
        return
    current.record(rejection, raw)
