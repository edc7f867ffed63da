"""Queue items the worker will not run: taken off the queue, recorded once, counted.

The transport (workers/broker/transport.py) checks every popped item against the envelope
contract (tasks/envelope.py) before kombu or Celery sees it; Celery's own late refusals
(workers/broker/consumer.py) end here too. A refusal names the job it can: a FAILURE with the
reason is recorded under the message's id when the id is the message's own (nobody had
claimed it, tasks/claims.py; a forged or replayed message must not overwrite another
job's record). Everything else goes to the dead-letter list, bounded, with the first
bytes of the item.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

import redis
from celery import Celery

from tasks.claims import REJECTED, Claim, claim_key
from tasks.envelope import Rejection
from tasks.errors import MessageRejected
from tasks.settings import DEAD_LETTER_KEY

log = logging.getLogger(__name__)

# The dead-letter list keeps the newest entries only: a flood of garbage must not fill
# the broker's memory.
DEAD_LETTER_MAX = 10_000
_RAW_BYTES = 2048


class Rejections:
    def __init__(self, app: Celery, r: redis.Redis, count: Callable[[str], None], ttl_s: int) -> None:
        self.app = app
        self.redis = r
        self.count = count
        self.ttl_s = ttl_s  # of a claim (Settings.result_ttl)

    def record(self, rejection: Rejection, raw: bytes | str | None, owner: bool = False) -> None:
        """`owner`: the caller knows the message holds its id's claim."""
        self.count(rejection.reason)
        log.warning("rejected a queue item (%s): %s", rejection.reason, rejection.detail)
        try:
            if rejection.job_id is not None and (owner or self._claim(rejection.job_id)):
                self.app.backend.mark_as_failure(rejection.job_id, MessageRejected(rejection.detail))
                return
            text = raw[:_RAW_BYTES].decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
            entry = {"id": rejection.job_id, "reason": f"{rejection.reason}: {rejection.detail}",
                     "raw": text[:_RAW_BYTES], "at": time.time()}
            self.redis.pipeline().lpush(DEAD_LETTER_KEY, json.dumps(entry)).ltrim(
                DEAD_LETTER_KEY, 0, DEAD_LETTER_MAX - 1).execute()
        except Exception as err:  # noqa: BLE001 - the backend's own errors after its retries too
            # The item is gone from the queue either way: refusing it must not stop the worker.
            log.error("could not record the rejected item (%s): %s", rejection.reason, err)

    def _claim(self, job_id: str) -> bool:
        """Claim an unclaimed id for the refusal (a claim no job matches): a failure is
        recorded only under an id no job holds, never over somebody else's."""
        claim = Claim(REJECTED, None, "worker").encode()
        return bool(self.redis.set(claim_key(job_id), claim, nx=True, ex=self.ttl_s))
