"""kombu's Redis transport, minus the ways to stop a worker with a single LPUSH and one
way to lose a message when Redis goes away.

kombu decodes every item it pops off a queue list as a JSON message envelope inside
the worker's event loop, and hands it to Celery. An item that is not one (garbage, too
deeply nested, an id that is not a string, no id, an ETA, a header of the wrong type)
raises out of the loop, where Celery stops the worker as an "unrecoverable error", or
gets into celery-batches' buffer and breaks it. Here every popped item is checked
against the envelope contract (tasks/envelope.py) first; one that fails is taken off
the queue (it is never recorded as unacked, so it holds no prefetch slot) and recorded
once with its reason (workers/rejections.py). The worker keeps serving.

kombu moves a message from its queue list to the unacked set in two steps: BRPOP, then
a write recording it as unacked. When the connection drops between the two (Redis
killed or restarted, a network cut), or Redis refuses the write (maxmemory), the message
exists only in this process: kombu drops it, or stops the worker. Here it is kept and pushed back to the head of its queue as soon as the
worker is connected again. If the write did reach Redis before the drop, the job is
delivered twice; a job whose result is recorded is not run again (workers.batch_task).
"""

from __future__ import annotations

import logging
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from tasks import envelope
from tasks.settings import ASSEMBLE_TASK, TASK_NAME

from . import rejections

log = logging.getLogger(__name__)

# (queue, message) popped whose unacked record failed: this process holds the only copy.
_unrecorded: list[tuple[str, str]] = []
# A lost connection, and only that: kombu's own connection_errors include KeyError, which
# a malformed envelope raises here too (it must be skipped, not put back).
_DROPPED = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

# What decoding or unpacking an envelope can raise: JSON/UTF-8/base64 errors
# (ValueError), missing keys or unknown body encodings (LookupError), wrong types, and
# nesting deeper than the stack (RecursionError).
_UNDECODABLE = (ValueError, LookupError, TypeError, AttributeError, RecursionError)
_TASKS = frozenset({TASK_NAME, ASSEMBLE_TASK})
_IDLE_KEY = "ttspool:idle"  # never written: a blocking pop on it is a pause


def _admit(item: bytes) -> dict[str, Any] | None:
    """The decoded envelope, or None when it was refused (and recorded)."""
    try:
        message = loads(bytes_to_str(item))
    except _UNDECODABLE as exc:
        rejection = envelope.Rejection("undecodable", f"queue item is not a JSON message envelope ({type(exc).__name__})",
                                       None)
    else:
        rejection = envelope.check(message, _TASKS)
        if rejection is None:
            return message
    rejections.record(rejection, item)
    return None


class QoS(kombu_redis.QoS):
    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().restore_visible(*args, **kwargs)
        except redis.exceptions.OutOfMemoryError:
            # Its mutex is a write; the scan runs again on the next timer tick.
            log.debug("unacked restore skipped: the broker refuses writes")
            return None


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _brpop_read(self, **options: Any) -> Any:
        # kombu's own, with the envelope checked between the pop and the delivery.
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not reply:
                raise Empty()
            dest, item = reply
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            message = _admit(item)
            if message is None:
                raise Empty()
            self.connection._deliver(message, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _brpop_start(self, timeout: Any = None) -> Any:
        try:
            while _unrecorded:
                queue, raw = _unrecorded[0]
                pri = self._get_message_priority(loads(raw), reverse=False)
                self.client.rpush(self._q_for_pri(queue, pri), raw)  # rpush: BRPOP takes it next
                _unrecorded.pop(0)
                log.warning("a message popped before it could be recorded as unacked is back on %s", queue)
        except redis.exceptions.OutOfMemoryError:
            # Redis refuses writes (maxmemory): popping more now would strand more messages
            # in this process. Wait on a key nobody writes, then try again.
            self._in_poll = self.client.connection
            self.client.connection.send_command("BRPOP", _IDLE_KEY, 1)
            return None
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
        except redis.exceptions.OutOfMemoryError:
            # Not delivered (kombu records before it hands the message on): it goes back
            # to its queue once Redis takes writes again, and the worker keeps running.
            _unrecorded.append((queue, raw))
            log.warning("the broker is out of memory and refused to record a message from %s as unacked; "
                        "it goes back to the queue when Redis takes writes again", queue)
