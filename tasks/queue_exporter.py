"""`ttspool exporter`: queue depth, unacked messages and oldest waiting age, read live.

One per deployment. Every scrape reads Redis afresh through one pipelined round trip
with short timeouts, so a down or hung Redis costs a scrape at most about a second
and shows as `ttspool_broker_up 0` instead of a hang; the next scrape after Redis
returns reads it again (redis-py reconnects on its own).
"""

from __future__ import annotations

import base64
import json
import logging
import signal
import sys
import time
from typing import Any, Iterator, Sequence

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from .celery_app import make_app
from .broker_redis import redis_client
from .metrics_http import start_server
from .settings import DEAD_LETTER_KEY, WORKER_QUEUES, Settings, redact_url

log = logging.getLogger(__name__)


class QueueCollector(Collector):
    """Reads the broker on every `collect()`; nothing is cached between scrapes."""

    def __init__(self, settings: Settings, queues: Sequence[str] = WORKER_QUEUES, timeout_s: float = 0.5) -> None:
        self.queues = tuple(queues)
        # The exact key layout kombu's Redis transport uses, from the same transport
        # options the app runs with: priority p > 0 of queue q lives in its own list
        # f"{q}{sep}{p}", and messages a worker holds are in the `unacked` hash.
        opts = make_app(settings).conf.broker_transport_options or {}
        self.steps = list(opts.get("priority_steps", PRIORITY_STEPS))
        self.sep = opts.get("sep", Channel.sep)
        self.prefix = opts.get("global_keyprefix", Channel.global_keyprefix)
        self.unacked_key = self.prefix + opts.get("unacked_key", Channel.unacked_key)
        self.client = redis_client(
            settings.broker_url, settings.redis_master_name, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )
        self.broker = redact_url(settings.broker_url)
        self._was_up: bool | None = None

    def lists(self, queue: str) -> list[str]:
        """The Redis lists that hold `queue`'s waiting messages, one per priority step."""
        return [self.prefix + (f"{queue}{self.sep}{p}" if p else queue) for p in self.steps]

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Registration must not touch Redis (the exporter starts even when it is down).
        return iter(())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("ttspool_broker_up", "1 if the exporter could read the Redis broker in this scrape")
        try:
            depth, unacked, oldest, dead, memory = self._read()
        except (redis.RedisError, OSError) as err:
            self._transition(False, err)
            up.add_metric([], 0)
            yield up
            return
        self._transition(True, None)
        up.add_metric([], 1)
        yield up
        yield _per_queue("ttspool_queue_depth", "Messages waiting in the queue, summed over its priority lists", depth)
        yield _per_queue("ttspool_queue_unacked", "Messages workers hold and have not acked yet (prefetched or running)", unacked)
        yield _per_queue("ttspool_queue_oldest_age_seconds",
                         "Age of the oldest waiting message (0 when empty; absent when no message says)", oldest)
        yield GaugeMetricFamily("ttspool_dead_letters", "Jobs in the dead-letter list", value=dead)
        yield GaugeMetricFamily("ttspool_broker_memory_used_bytes", "Memory the broker's Redis uses",
                                value=float(memory.get("used_memory", 0)))
        yield GaugeMetricFamily("ttspool_broker_memory_max_bytes",
                                "The broker's maxmemory (0: no limit); at it, Redis refuses writes",
                                value=float(memory.get("maxmemory", 0)))

    def _read(self) -> tuple[dict[str, float], dict[str, float], dict[str, float], float, dict[str, Any]]:
        pipe = self.client.pipeline(transaction=False)
        for q in self.queues:
            for key in self.lists(q):
                pipe.llen(key)
                # kombu LPUSHes and consumes from the right: the tail is the oldest.
                pipe.lindex(key, -1)
        # Bounded by workers x prefetch, so reading it whole each scrape is cheap.
        pipe.hvals(self.unacked_key)
        pipe.llen(DEAD_LETTER_KEY)
        pipe.info("memory")
        replies = pipe.execute()
        now = time.time()
        depth: dict[str, float] = {}
        oldest: dict[str, float] = {}
        i = 0
        for q in self.queues:
            total, ages = 0, []
            for _ in self.steps:
                n, tail = replies[i], replies[i + 1]
                i += 2
                total += n
                enqueued = enqueued_at(tail) if n else None
                if enqueued is not None:
                    ages.append(max(0.0, now - enqueued))
            depth[q] = total
            if total == 0:
                oldest[q] = 0.0
            elif ages:
                # Only the lists whose oldest message says when it was enqueued count:
                # with others, this is a lower bound (an SLO alert on it never fires
                # falsely).
                oldest[q] = max(ages)
        unacked = dict.fromkeys(self.queues, 0.0)
        for raw in replies[i]:
            queue = _unacked_queue(raw)
            if queue in unacked:
                unacked[queue] += 1
        return depth, unacked, oldest, replies[i + 1], replies[i + 2]

    def _transition(self, up: bool, err: Exception | None) -> None:
        # Log changes only: a Redis outage would otherwise log once per scrape.
        if up != self._was_up:
            if up:
                log.info("broker %s reachable", self.broker)
            else:
                log.warning("broker %s unreachable: %s", self.broker, type(err).__name__)
        self._was_up = up


def _per_queue(name: str, doc: str, values: dict[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["queue"])
    for queue, value in values.items():
        family.add_metric([queue], value)
    return family


def _unacked_queue(raw: bytes) -> str | None:
    # kombu stores [message, exchange, routing_key]; each ttspool queue is bound with
    # its own name as routing key.
    try:
        entry = json.loads(raw)
        return str(entry[2])
    except (ValueError, TypeError, IndexError, KeyError):
        return None


def enqueued_at(raw: bytes | None) -> float | None:
    """When a waiting message was enqueued, if it says so.

    Celery's message headers and properties carry no send time, so this relies on
    ttspool's own job field: the body of a protocol-2 JSON message is
    [args, kwargs, embed], and producers that use the Python API (or set it
    themselves) put `enqueued_at` (Unix seconds) in kwargs. Anything else is unknown.
    """
    if raw is None:
        return None
    try:
        message = json.loads(raw)
        body: Any = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        if message.get("content-type") != "application/json":
            return None
        kwargs = json.loads(body)[1]
        value = kwargs.get("enqueued_at")
        return float(value) if isinstance(value, (int, float)) else None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def make_registry(settings: Settings, timeout_s: float = 0.5) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(QueueCollector(settings, timeout_s=timeout_s))
    return registry


def run_exporter(settings: Settings, addr: str, port: int) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = start_server(make_registry(settings), addr, port)
    log.info("exporting queue metrics of %s on http://%s:%d/metrics",
             redact_url(settings.broker_url), addr, server.server_port)
    # Exit cleanly (status 0) on SIGTERM from a supervisor.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return 0
