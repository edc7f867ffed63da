"""kombu's Redis transport, minus the ways to stop a worker with a single LPUSH, and
minus the window in which a popped message exists only in the worker.

kombu decodes every item it pops off a queue list as a JSON message envelope inside
the worker's event loop, and hands it to Celery. An item that is not one (garbage, too
deeply nested, an id that is not a string, no id, an ETA, a header of the wrong type)
raises out of the loop, where Celery stops the worker as an "unrecoverable error", or
gets into celery-batches' buffer and breaks it. Here every popped item is checked
against the envelope contract (tasks/envelope.py) first; one that fails is taken off
the queue (its unacked record is dropped, so it holds no prefetch slot and never comes
back) and recorded once with its reason (workers/pipeline/rejections.py). The worker keeps serving.
kombu builds the transport from a class, so each worker gets classes of its own
(`transport_for`) that carry its recorder and test hook as class attributes.

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
from typing import Any, Callable, Collection

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from tasks import envelope
from tasks.broker_redis import FailoverConnection
from tasks.settings import ASSEMBLE_TASK, TASK_NAME
from workers.pipeline.rejections import Rejections


log = logging.getLogger(__name__)

# What decoding or unpacking an envelope can raise: JSON/UTF-8/base64 errors
# (ValueError), missing keys or unknown body encodings (LookupError), wrong types, and
# nesting deeper than the stack (RecursionError).
_UNDECODABLE = (ValueError, LookupError, TypeError, AttributeError, RecursionError)
_TASKS = frozenset({TASK_NAME, ASSEMBLE_TASK})
_IDLE_KEY = "ttspool:idle"  # never written: a blocking pop on it is a pause
_IDLE_S = 0.05
# KEYS: the queue lists in the order to try them, then kombu's unacked hash and index.
# ARGV[1]: the time to index the delivery at (the worker's clock, as kombu's restore reads
# it); ARGV[1 + i]: the queue KEYS[i] belongs to. The record names that queue as its
# routing key on the default exchange, so a restore puts the message back where it was,
# whatever the message says of itself. Returns {list, item, tag}, tag false when the item
# has no delivery tag to record it under (the worker refuses it).
_FETCH = """#!lua
local n = #KEYS - 2
for i = 1, n do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, msg = pcall(cjson.decode, item)
    if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
      local tag = msg['properties']['delivery_tag']
      if type(tag) == 'string' and type(msg['properties']['delivery_info']) == 'table' then
        redis.call('ZADD', KEYS[n + 2], ARGV[1], tag)
        redis.call('HSET', KEYS[n + 1], tag, '[' .. item .. ',"",' .. cjson.encode(ARGV[1 + i]) .. ']')
        return {KEYS[i], item, tag}
      end
    end
    return {KEYS[i], item, false}
  end
end
return false
"""
# A message this worker held goes back to the head of its queue list (where kombu's
# restore puts one), unless Redis has its unacked record (then it is the broker's still,
# and kombu's restore brings it back if need be). KEYS: the unacked hash, the list;
# ARGV: the delivery tag, the message. Returns 1 when it was pushed.
_RESEND = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"""


def _admit(item: bytes, recorded: bool, rejections: Rejections) -> dict[str, Any] | None:
    """The decoded envelope, or None when it was refused (and the refusal recorded).
    `recorded`: the fetch recorded it as unacked (Lua's JSON decoder accepted it too)."""
    try:
        message = loads(bytes_to_str(item))
    except _UNDECODABLE as exc:
        rejection = envelope.Rejection("undecodable", f"queue item is not a JSON message envelope ({type(exc).__name__})",
                                       None)
    else:
        rejection = envelope.check(message, _TASKS)
        if rejection is None and not recorded:
            rejection = envelope.Rejection("undecodable", "the broker could not read the envelope's delivery tag "
                                                          "(JSON its decoder refuses)", None)
        if rejection is None:
            return message
    rejections.record(rejection, item)
    return None


class QoS(kombu_redis.QoS):
    """kombu's books of unacked messages, with acks and requeues that a Redis refusing
    writes cannot turn into an error out of Celery's event loop.

    Celery runs every ack and requeue as a callback of the consumer's event loop
    (`Consumer.call_soon`), where an exception stops the worker ("Unrecoverable error").
    At maxmemory Redis refuses every command queued in a MULTI, also the ZREM and HDEL of
    kombu's ack, which only free memory: here they go without MULTI, so an ack passes
    at maxmemory. A requeue must write (it pushes the message back on its list): one
    Redis refuses is tried again at every sweep (`restore_visible`, every
    `unacked_restore_interval`) until it passes; the message's unacked record stays in
    Redis meanwhile, so a worker that dies first loses nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._requeues: dict[Any, bool] = {}  # tag: leftmost, requeues Redis refused

    def append(self, message: Any, delivery_tag: Any) -> None:
        # The fetch script recorded it in Redis already: only this process's own books.
        kombu_redis.virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        self._forget(delivery_tag)
        kombu_redis.virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)
        else:
            self._forget(delivery_tag)
        kombu_redis.virtual.QoS.ack(self, delivery_tag)

    def _forget(self, delivery_tag: Any) -> None:
        """Drop the message's unacked record: it is done with."""
        try:
            self._remove_from_indices(delivery_tag).execute()
        except redis.exceptions.ResponseError as err:
            # A Redis that refuses even deletes (MISCONF: its snapshots fail): the record
            # stays, the message comes back after the visibility timeout, and admission
            # reports its recorded result then without running it again.
            log.warning("the broker refused to drop an unacked record (%s); the message comes back after the "
                        "visibility timeout", err)

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        if pipe is not None:
            return super()._remove_from_indices(delivery_tag, pipe)  # inside kombu's restore transaction
        # No MULTI (refused whole at maxmemory). The record first: cut off between the
        # two, what is left is an index entry, which the restore sweep drops.
        with self.channel.conn_or_acquire() as client:
            return client.pipeline(transaction=False).hdel(self.unacked_key, delivery_tag) \
                .zrem(self.unacked_index_key, delivery_tag)

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> Any:
        try:
            done = super().restore_by_tag(tag, client, leftmost)
            self._requeues.pop(tag, None)
            return done
        except (*_UNDECODABLE, redis.exceptions.DataError) as exc:
            # A record that cannot go back to a queue would stop every restore sweep (and
            # every worker start) at it: it is dropped and dead-lettered instead.
            log.error("dropped an unacked record that could not be restored (%s)", type(exc).__name__)
            self._requeues.pop(tag, None)
            self._forget(tag)
            self.channel.rejections.record(envelope.Rejection("undecodable", f"an unacked record could not be restored "
                                                                f"({type(exc).__name__})", None), None)
            return None
        except redis.exceptions.ResponseError as err:
            # Refused (maxmemory): the record stays unacked in Redis; tried again at the
            # next sweep, and restored by the visibility timeout if this worker is gone.
            if tag not in self._requeues:
                log.warning("the broker refused to requeue a message (%s); trying again at each sweep", err)
            self._requeues[tag] = leftmost
            return None

    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        for tag, leftmost in list(self._requeues.items()):
            self.restore_by_tag(tag, leftmost=leftmost)
        try:
            return super().restore_visible(*args, **kwargs)
        except redis.exceptions.OutOfMemoryError:
            # Its mutex is a write; the scan runs again on the next timer tick.
            log.debug("unacked restore skipped: the broker refuses writes")
            return None


class Channel(kombu_redis.Channel):
    QoS = QoS
    _paused = False  # the command in flight is the idle pause, not a fetch
    rejections: Rejections  # set by transport_for
    # A test hook (workers/faults.py): called with each fetched item before it is delivered.
    on_fetch: Callable[[bytes], None] | None = None

    def resend(self, client: redis.Redis, message: Any, queues: Collection[str], default_queue: str) -> bool:
        """Put a message this channel delivered back at the head of its queue, with its id,
        body and delivery tag, marked redelivered as kombu's restore marks one, unless
        Redis still has its unacked record. Its queue is its routing key when that is one
        of `queues` (the producer's routes: a queue's routing key is its name), else
        `default_queue`. True when it was put back."""
        raw = message.serializable()
        props = raw["properties"]
        info = props.get("delivery_info") or {}
        payload = {**raw, "headers": {**raw["headers"], "redelivered": True},
                   "properties": {**props, "delivery_info": {**info, "redelivered": True}}}
        queue = info.get("routing_key") if info.get("routing_key") in queues else default_queue
        key = self._q_for_pri(queue, self._get_message_priority(payload, reverse=False))
        return bool(client.eval(_RESEND, 2, self.unacked_key, key, message.delivery_tag, dumps(payload)))

    def _brpop_start(self, timeout: Any = None) -> Any:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        if self._paused:
            self.client.connection.send_command("BRPOP", _IDLE_KEY, _IDLE_S)
            return None
        order = [(queue, pri) for pri in self.priority_steps for queue in queues]
        keys = [self._q_for_pri(queue, pri) for queue, pri in order]
        self.client.connection.send_command("EVAL", _FETCH, len(keys) + 2, *keys, self.unacked_key,
                                            self.unacked_index_key, time.time(), *(queue for queue, _ in order))
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
            dest, item, tag = reply
            if self.on_fetch is not None:
                self.on_fetch(item)
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            message = _admit(item, tag is not None, self.rejections)
            if message is None:
                if tag is not None:
                    self.qos._remove_from_indices(tag).execute()
                raise Empty()
            self.connection._deliver(message, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _size(self, queue: str) -> int:
        # kombu's reads the lists in a MULTI, which a Redis at maxmemory refuses whole:
        # the worker would then fail to start (and crash-loop) while the broker is full.
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            for pri in self.priority_steps:
                pipe.llen(self._q_for_pri(queue, pri))
            return int(sum(size for size in pipe.execute() if size))

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        try:
            super()._queue_bind(exchange, routing_key, pattern, queue)
        except redis.exceptions.OutOfMemoryError:
            # A worker starting while the broker is full. Its job queues were bound by
            # earlier starts (re-adding a binding is still a refused write); without that,
            # fail. Its remote-control queue is new (named after the host and pid) and only
            # serves `celery inspect`/`control`: this worker does without until it restarts.
            if self.typeof(exchange).type == "fanout":
                log.warning("the broker is full: remote control (%s) stays off for this worker", queue)
                return
            member = self.sep.join([routing_key or "", pattern or "", queue or ""])
            with self.conn_or_acquire() as client:
                if not client.sismember(self.keyprefix_queue % (exchange,), member):
                    raise

    def _get(self, queue: str) -> Any:
        # basic_get (not used by the worker): the same atomic fetch, for one queue.
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps]
        with self.conn_or_acquire() as client:
            reply = client.eval(_FETCH, len(keys) + 2, *keys, self.unacked_key, self.unacked_index_key, time.time(),
                                *([queue] * len(keys)))
        if not reply:
            raise Empty()
        return loads(bytes_to_str(reply[1]))


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same fetch, over kombu's Sentinel-managed connection pool (sentinel:// URLs):
    a reconnect asks the sentinels for the current primary."""

    connection_class = FailoverConnection


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def transport_for(sentinel: bool, rejections: Rejections,
                  on_fetch: Callable[[bytes], None] | None = None) -> type[kombu_redis.Transport]:
    """This worker's transport class (kombu takes a class, not an object): the channel
    records refusals with `rejections` and calls `on_fetch` with every fetched item."""
    base = SentinelTransport if sentinel else Transport
    # staticmethod: a plain function as a class attribute would be called as a method.
    channel = type(base.Channel.__name__, (base.Channel,),
                   {"rejections": rejections, "on_fetch": None if on_fetch is None else staticmethod(on_fetch)})
    return type(base.__name__, (base,), {"Channel": channel})
