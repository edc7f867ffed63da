"""kombu's Redis transport, minus the ways to stop a worker with a single LPUSH, and
minus the window in which a popped message exists only in the worker.

kombu decodes every item it pops off a queue list as a JSON message envelope inside
the worker's event loop, and hands it to Celery. An item that is not one (garbage, too
deeply nested, an id that is not a string, no id, an ETA, a header of the wrong type)
raises out of the loop, where Celery stops the worker as an "unrecoverable error", or
gets into celery-batches' buffer and breaks it. Here every popped item is checked
against the envelope contract (tasks/envelope.py) first; one that fails is taken off
the queue (its unacked record is dropped, so it holds no prefetch slot and never comes
back) and recorded once with its reason (workers/rejections.py). The worker keeps serving.

kombu moves a message from its queue list to its unacked set in two steps: BRPOP, then
a write recording it as unacked. A worker killed between the two, a connection cut
there, or a write Redis refuses (maxmemory) lost the message. Here one Lua script pops
the message and records it as unacked, in kombu's own format, atomically: from then on
the broker has it, and kombu's visibility-timeout restore brings it back if this worker
dies. Redis has no blocking pop that records (BLMOVE waits on one list; a worker reads
many, by priority), so when every queue is empty the worker pauses on a key nobody writes
(at most _IDLE_S) and fetches again: an idle worker costs Redis 1/_IDLE_S cheap calls a
second and adds at most _IDLE_S to a job's wait. The script declares itself a writer
(Redis >= 7), so at maxmemory Redis refuses it whole, before it pops anything.
"""

from __future__ import annotations

import logging
import time
from queue import Empty
from time import monotonic
from typing import Any, Callable

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from tasks import envelope
from tasks.settings import ASSEMBLE_TASK, TASK_NAME

from . import rejections

log = logging.getLogger(__name__)

# What decoding or unpacking an envelope can raise: JSON/UTF-8/base64 errors
# (ValueError), missing keys or unknown body encodings (LookupError), wrong types, and
# nesting deeper than the stack (RecursionError).
_UNDECODABLE = (ValueError, LookupError, TypeError, AttributeError, RecursionError)
_TASKS = frozenset({TASK_NAME, ASSEMBLE_TASK})
_IDLE_KEY = "ttspool:idle"  # never written: a blocking pop on it is a pause
_IDLE_S = 0.05
# KEYS: the queue lists in the order to try them, then kombu's unacked hash and index.
# ARGV[1]: the time to index the delivery at (the worker's clock, as kombu's restore reads it).
_FETCH = """#!lua
local n = #KEYS - 2
for i = 1, n do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, msg = pcall(cjson.decode, item)
    if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
      local tag, info = msg['properties']['delivery_tag'], msg['properties']['delivery_info']
      if type(tag) == 'string' and type(info) == 'table' then
        local ex, rk = info['exchange'], info['routing_key']
        if type(ex) ~= 'string' then ex = '' end
        if type(rk) ~= 'string' then rk = '' end
        redis.call('ZADD', KEYS[n + 2], ARGV[1], tag)
        redis.call('HSET', KEYS[n + 1], tag, '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
      end
    end
    return {KEYS[i], item}
  end
end
return false
"""
# A test hook (workers/faults.py): called with each fetched item before it is delivered.
on_fetch: Callable[[bytes], None] | None = None


def _admit(item: bytes) -> tuple[dict[str, Any] | None, Any]:
    """(the decoded envelope, None) or, when it was refused (and recorded), (None, its
    delivery tag if it has one: the fetch recorded it as unacked)."""
    message: Any = None
    try:
        message = loads(bytes_to_str(item))
    except _UNDECODABLE as exc:
        rejection = envelope.Rejection("undecodable", f"queue item is not a JSON message envelope ({type(exc).__name__})",
                                       None)
    else:
        rejection = envelope.check(message, _TASKS)
        if rejection is None:
            return message, None
    rejections.record(rejection, item)
    props = message.get("properties") if isinstance(message, dict) else None
    return None, props.get("delivery_tag") if isinstance(props, dict) else None


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: Any) -> None:
        # The fetch script recorded it in Redis already: only this process's own books.
        kombu_redis.virtual.QoS.append(self, message, delivery_tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().restore_visible(*args, **kwargs)
        except redis.exceptions.OutOfMemoryError:
            # Its mutex is a write; the scan runs again on the next timer tick.
            log.debug("unacked restore skipped: the broker refuses writes")
            return None


class Channel(kombu_redis.Channel):
    QoS = QoS
    _paused = False  # the command in flight is the idle pause, not a fetch

    def _brpop_start(self, timeout: Any = None) -> Any:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        if self._paused:
            self.client.connection.send_command("BRPOP", _IDLE_KEY, _IDLE_S)
            return None
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self.client.connection.send_command("EVAL", _FETCH, len(keys) + 2, *keys, self.unacked_key,
                                            self.unacked_index_key, time.time())
        return None

    def _brpop_read(self, **options: Any) -> Any:
        # kombu's own, reading the fetch script's reply (or the pause's), with the
        # envelope checked between the fetch and the delivery.
        paused, self._paused = self._paused, False
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except redis.exceptions.OutOfMemoryError:
                self._paused = True  # nothing was popped: wait, then try again
                raise Empty() from None
            if not reply or paused:
                self._paused = not paused
                raise Empty()
            dest, item = reply
            if on_fetch is not None:
                on_fetch(item)
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            message, tag = _admit(item)
            if message is None:
                if isinstance(tag, str):
                    self.qos._remove_from_indices(tag).execute()
                raise Empty()
            self.connection._deliver(message, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _get(self, queue: str) -> Any:
        # basic_get: the same atomic fetch, for one queue.
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps]
        with self.conn_or_acquire() as client:
            reply = client.eval(_FETCH, len(keys) + 2, *keys, self.unacked_key, self.unacked_index_key, time.time())
        if not reply:
            raise Empty()
        return loads(bytes_to_str(reply[1]))


class Transport(kombu_redis.Transport):
    Channel = Channel
