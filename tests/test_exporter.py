"""`ttspool exporter` against a real redis-server: priority lists, unacked, age, outages."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from tasks.celery_app import make_app
from tasks.cli.local_redis import LocalRedis
from tasks.producer import Client
from tasks.settings import QUEUE_BULK, QUEUE_REALTIME, TASK_NAME, Settings

from .scrape import Exporter, check_metrics, fetch, value


@pytest.fixture()
def broker() -> Iterator[LocalRedis]:
    # Its own Redis: these tests stop and freeze it.
    server = LocalRedis().start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.close()


@pytest.fixture()
def exporter(broker: LocalRedis, tmp_path: Path) -> Iterator[Exporter]:
    exp = Exporter(broker.url, tmp_path / "exporter.log")
    yield exp
    exp.stop()


def test_depth_sums_priority_lists_and_counts_unacked_and_age(broker: LocalRedis, exporter: Exporter) -> None:
    settings = Settings(broker_url=broker.url)
    client = Client(settings)
    app = make_app(settings)
    try:
        # First in, so it is at the consuming end of the list: the oldest.
        app.send_task(TASK_NAME, kwargs={"text": "old", "enqueued_at": time.time() - 1000}, queue=QUEUE_REALTIME)
        client.submit_many([{"text": f"job {i}"} for i in range(3)] + [{"text": "now", "priority": "realtime"}])
        # Celery priorities land in separate Redis lists (tts.bulk\x06\x163, ...).
        for prio in (3, 9):
            app.send_task(TASK_NAME, kwargs={"text": f"prio {prio}"}, queue=QUEUE_BULK, priority=prio)

        s = exporter.scrape()
        assert value(s, "ttspool_broker_up") == 1
        assert value(s, "ttspool_broker_memory_used_bytes") > 0 and value(s, "ttspool_broker_memory_max_bytes") == 0
        client.redis.config_set("maxmemory", 512 * 1024 * 1024)
        try:
            assert value(exporter.scrape(), "ttspool_broker_memory_max_bytes") == 512 * 1024 * 1024
        finally:
            client.redis.config_set("maxmemory", 0)
        assert value(s, "ttspool_queue_depth", queue=QUEUE_BULK) == 5
        assert value(s, "ttspool_queue_depth", queue=QUEUE_REALTIME) == 2
        assert value(s, "ttspool_queue_unacked", queue=QUEUE_BULK) == 0
        # The oldest message is the one the producer dated 1000 s back.
        age = value(s, "ttspool_queue_oldest_age_seconds", queue=QUEUE_REALTIME)
        assert age is not None and 1000 <= age < 1100
        bulk_age = value(s, "ttspool_queue_oldest_age_seconds", queue=QUEUE_BULK)
        assert bulk_age is not None and 0 <= bulk_age < 100

        # A real kombu consumer takes one message without acking it: waiting -> unacked.
        with app.connection() as conn:
            message = conn.default_channel.basic_get(queue=QUEUE_BULK, no_ack=False)
            assert message is not None
            s = exporter.scrape()
            assert value(s, "ttspool_queue_depth", queue=QUEUE_BULK) == 4
            assert value(s, "ttspool_queue_unacked", queue=QUEUE_BULK) == 1
            message.ack()
        s = exporter.scrape()
        assert value(s, "ttspool_queue_unacked", queue=QUEUE_BULK) == 0
        status, text = fetch(exporter.url)
        assert status == 200
        check_metrics(text)
    finally:
        app.close()
        client.close()


def test_age_of_undated_messages_is_absent_and_empty_queue_is_zero(broker: LocalRedis, exporter: Exporter) -> None:
    app = make_app(Settings(broker_url=broker.url))
    try:
        # A message from a client that does not set enqueued_at: its age is unknown.
        app.send_task(TASK_NAME, kwargs={"text": "undated"}, queue=QUEUE_BULK)
        s = exporter.scrape()
        assert value(s, "ttspool_queue_depth", queue=QUEUE_BULK) == 1
        assert value(s, "ttspool_queue_oldest_age_seconds", queue=QUEUE_BULK) is None
        assert value(s, "ttspool_queue_oldest_age_seconds", queue=QUEUE_REALTIME) == 0
    finally:
        app.close()


def _timed_scrape(exporter: Exporter) -> tuple[float | None, float]:
    t0 = time.monotonic()
    s = exporter.scrape()
    return value(s, "ttspool_broker_up"), time.monotonic() - t0


def test_redis_stopped_then_restarted(broker: LocalRedis, exporter: Exporter) -> None:
    assert _timed_scrape(exporter)[0] == 1
    broker.stop()
    up, took = _timed_scrape(exporter)
    assert up == 0 and took < 2.0
    assert value(exporter.scrape(), "ttspool_queue_depth", queue=QUEUE_BULK) is None  # no stale numbers
    broker.start()  # same port
    assert _timed_scrape(exporter)[0] == 1
    assert value(exporter.scrape(), "ttspool_queue_depth", queue=QUEUE_BULK) == 0


def test_hung_redis_does_not_hang_a_scrape(broker: LocalRedis, exporter: Exporter) -> None:
    assert broker.proc is not None
    assert _timed_scrape(exporter)[0] == 1
    os.kill(broker.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
    try:
        up, took = _timed_scrape(exporter)
        assert up == 0 and took < 2.0
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert _timed_scrape(exporter)[0] == 1
