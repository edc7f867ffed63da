"""The Celery app both sides share: JSON only, late acks, one setting for visibility."""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from .settings import QUEUE_BULK, QUEUES, Settings


def make_app(settings: Settings, *, worker_consumer: str | None = None) -> Celery:
    app = Celery("ttspool", broker=settings.broker_url, backend=settings.backend_url)
    transport = {
        # Redis re-delivers an unacked message after this long; it must cover waiting in
        # the worker's buffer, the batch and the upload, or a job runs twice.
        "visibility_timeout": settings.visibility_timeout,
        # Poll tts.realtime before tts.bulk instead of round-robin.
        "queue_order_strategy": "priority",
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
        "health_check_interval": 25,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        # Each queue its own direct exchange: a bare Queue(name) would bind to the
        # default exchange and routing key, and send everything to the default queue.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue=QUEUE_BULK,
        broker_transport_options=transport,
        result_backend_transport_options=dict(transport),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        result_expires=7 * 86400,
        result_extended=False,
        # One process owns one GPU; the buffer must hold more than one batch so the
        # next batch fills while the current one runs (celery-batches needs
        # prefetch x concurrency > flush_every).
        worker_prefetch_multiplier=max(4, 2 * settings.max_batch),
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    if worker_consumer:
        app.conf.worker_consumer = worker_consumer
    return app
