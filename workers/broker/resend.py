"""The messages a worker holds, sent again when its broker comes back without its data.

A worker holds messages unacked for a while (its window and its GPU batch); Redis keeps
an unacked record of each (workers/broker/transport.py), from which kombu's restore puts
a message back on its queue once the visibility timeout has passed without an ack. A
lost connection ends the worker's hold: Celery starts a new consumer, and the requests
of the old one cannot be acked any more (workers.broker.gpu_batches), so the worker
lets them go and Redis brings them back. A Redis that restarted without persistence has
no record to bring back: those jobs were dropped silently.

So after every reconnect the worker asks whether Redis kept its data. The epoch key is
set once with a random token and read back after each reconnect: a Redis that kept its
data answers with the token this worker last saw; one that lost it has none (or the
token of another worker that came back first). Then each message the worker held is put
back at the head of its queue, unless Redis has its unacked record after all (one
script, workers.broker.transport.Channel.resend), and runs once more from the queue:
- a job whose result was recorded meanwhile is reported once, not run again
  (workers.pipeline.admission);
- a job still running in the GPU batch, or admitted and waiting, is the same job to the
  worker's table of held work (same id, same kwargs): held again, not admitted again,
  and acked when its row is recorded; a job finished before its copy arrives has the
  copy acked on arrival (HeldMessages.expect_again): its result may have been written
  to the Redis that lost it, just before the restart;
- a job that only sat in the queue list is not known to any worker: lost with the data.
While Redis refuses (down again, at maxmemory), the check and the re-sends are tried
again at every scheduler tick; a message is re-sent at most once per lost connection.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Callable, Collection, Sequence

import redis

log = logging.getLogger(__name__)

EPOCH_KEY = "ttspool:broker-epoch"


class Resender:
    def __init__(self, r: redis.Redis, queues: Collection[str], default_queue: str,
                 expect: Callable[[Sequence[Any]], None]) -> None:
        """`queues`: those a message may be sent back to (its routing key), else
        `default_queue`; `expect(requests)`: told before their copies are sent
        (HeldMessages.expect_again)."""
        self.redis = r
        self.expect = expect
        self.queues = frozenset(queues)
        self.default_queue = default_queue
        self._epoch: bytes | None = None  # the token Redis held when last asked
        self._orphans: list[Any] = []  # requests of lost connections, oldest first
        self._lost: bool | None = None  # whether Redis lost them; None: not asked yet
        self._asking = False
        self._warned = False

    def reconnected(self, held: Sequence[Any]) -> None:
        """A consumer (re)connected; `held`: the requests the worker held on the
        connection before (none at the first)."""
        self._orphans.extend(held)
        if self._lost is not True:
            self._lost = None
        self._asking = True
        self.retry()

    def retry(self) -> None:
        """Settle what the last reconnect left: every scheduler tick calls this."""
        if not self._asking:
            return
        try:
            if self._lost is None:
                self._lost = self._data_lost()
            if self._lost:
                self.expect(self._orphans)
                sent = 0
                while self._orphans:
                    req = self._orphans[-1]  # the newest first: the oldest ends up at the head
                    sent += req.message.channel.resend(self.redis, req.message, self.queues, self.default_queue)
                    self._orphans.pop()
                if sent:
                    log.warning("the broker came back without its data: %d held message(s) sent again", sent)
        except redis.RedisError as err:
            if not self._warned:
                log.warning("could not check the broker for lost messages yet (%s); trying again", err)
                self._warned = True
            return
        self._orphans.clear()
        self._lost = None
        self._asking = self._warned = False

    def _data_lost(self) -> bool:
        """Whether Redis lost its data since this worker last asked (never at the first
        ask: nothing was held before it)."""
        token = uuid.uuid4().hex.encode()
        old = self.redis.set(EPOCH_KEY, token, nx=True, get=True)
        now = token if old is None else old
        lost = self._epoch is not None and now != self._epoch
        self._epoch = now
        return lost
