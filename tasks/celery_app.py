"""The Celery app both sides share: JSON only, late acks, one setting for visibility."""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from .broker_redis import is_sentinel
from .claimed_publish import ClaimedSentinelTransport, ClaimedTransport
from .result_backend import backend_url
from .settings import ASSEMBLE_TASK, QUEUE_ASSEMBLE, QUEUE_BULK, WORKER_QUEUES, Settings


def make_app(settings: Settings) -> Celery:
    app = Celery("ttspool", broker=settings.broker_url, backend=backend_url(settings.backend_url))
    transport = {
        # Redis re-delivers an unacked message after this long; it must cover waiting in
        # the worker's buffer, the batch and the upload, or a job runs twice.
        "visibility_timeout": settings.visibility_timeout,
        # kombu sweeps for such messages every interval x throttle seconds (100 s by
        # default); a tenth of the timeout keeps redelivery close to the timeout itself.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
        "unacked_restore_throttle": 1,
        # The sweep's lock outlives a worker killed mid-sweep (or a Redis restart) by
        # this long, which delays every restore: at most one more visibility timeout.
        "unacked_mutex_expire": min(300, settings.visibility_timeout),
        # Poll tts.realtime before tts.bulk instead of round-robin.
        "queue_order_strategy": "priority",
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
        "health_check_interval": 25,
        # Read only for sentinel:// URLs (kombu's and Celery's Sentinel support).
        "master_name": settings.redis_master_name,
    }
    app.conf.update(
        # A producer's claimed jobs are pushed by a script that marks their claims sent
        # (tasks/claimed_publish.py); the worker sets a transport of its own.
        broker_transport=ClaimedSentinelTransport if is_sentinel(settings.broker_url) else ClaimedTransport,
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
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in WORKER_QUEUES],
        task_routes={ASSEMBLE_TASK: {"queue": QUEUE_ASSEMBLE}},
        task_default_queue=QUEUE_BULK,
        broker_transport_options=transport,
        result_backend_transport_options=dict(transport),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Ride out a Redis restart: a result write or a publish retries for about 20 s
        # instead of failing the batch or the submit on the first refused connection.
        result_backend_always_retry=True,
        result_backend_max_retries=12,
        task_publish_retry_policy={"max_retries": 10, "interval_start": 0, "interval_step": 0.5, "interval_max": 3},
        result_expires=settings.result_ttl,
        result_extended=False,
        # One process owns one GPU; its prefetch (the window it batches from) is the
        # worker policy's (scheduler/worker_policy.py), set by the worker.
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        # Flower and celery-exporter read these; ttspool's batched jobs send theirs
        # through workers.pipeline.task_events (celery-batches sends none).
        worker_send_task_events=settings.task_events,
        enable_utc=True,
    )
    return app
