"""kombu's Redis transport, minus one way to stop a worker with a single LPUSH and one
way to lose a message when Redis goes away.

kombu decodes every item it pops off a queue list as a JSON message envelope inside
the worker's event loop. An item that is not one (garbage, a truncated write, another
program's data, an envelope without properties) raises out of the loop, and Celery
stops the worker as an "unrecoverable error". Such an item names no job to fail, so
it is logged with the reason and skipped; the worker keeps serving. Messages that do
decode go on to Celery, whose own checks (workers.consumer) record a FAILURE.

kombu moves a message from its queue list to the unacked set in two steps: BRPOP, then
a write recording it as unacked. When the connection drops between the two (Redis
killed or restarted, a network cut), the message exists only in this process: kombu
drops it. Here it is kept and pushed back to the head of its queue as soon as the
worker is connected again. If the write did reach Redis before the drop, the job is
delivered twice; a job whose result is recorded is not run again (workers.batch_task).
"""

from __future__ import annotations

import logging
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps, loads

log = logging.getLogger(__name__)

# (queue, message) popped whose unacked record failed: this process holds the only copy.
_unrecorded: list[tuple[str, str]] = []
# A lost connection, and only that: kombu's own connection_errors include KeyError, which
# a malformed envelope raises here too (it must be skipped, not put back).
_DROPPED = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

# What decoding or unpacking an envelope can raise: JSON/UTF-8/base64 errors
# (ValueError), missing keys or unknown body encodings (LookupError), wrong types.
_UNDECODABLE = (ValueError, LookupError, TypeError, AttributeError)


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except _UNDECODABLE as exc:
            log.error("skipped a queue item that is not a Celery message (%s: %.200s)", type(exc).__name__, exc)
            raise Empty() from None

    def _brpop_start(self, timeout: Any = None) -> Any:
        while _unrecorded:
            queue, raw = _unrecorded[0]
            pri = self._get_message_priority(loads(raw), reverse=False)
            self.client.rpush(self._q_for_pri(queue, pri), raw)  # rpush: BRPOP takes it next
            _unrecorded.pop(0)
            log.warning("a message popped before the broker connection dropped is back on %s", queue)
        return super()._brpop_start(timeout)


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message: Any, queue: str) -> None:
        raw = dumps(message)  # before Celery's Message wraps (and mutates) it
        try:
            super()._deliver(message, queue)
        except _DROPPED:
            _unrecorded.append((queue, raw))
            log.warning("broker connection dropped while recording a message from %s as unacked; "
                        "it goes back to the queue on reconnect", queue)
            raise
