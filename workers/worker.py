"""`ttspool worker`: one process, one GPU, one engine, one batch at a time."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import redis
from celery.signals import worker_ready

from storage import StorageError, storage_for
from storage.probe import fix_for, probe
from tasks.celery_app import make_app
from tasks.broker_redis import broker_redis, is_sentinel
from tasks.errors import SettingsError
from tasks.settings import QUEUE_BULK, WORKER_QUEUES, Settings, redact_url

from workers import faults
from workers.broker.consumer import consumer_for
from workers.broker.event_outbox import EventOutbox
from workers.broker.gpu_batches import register
from workers.broker.held_messages import HeldMessages
from workers.broker.resend import Resender
from workers.broker.transport import transport_for
from workers.engine.assets import ModelFetch
from workers.engine.engine import Engine
from workers.metrics import Metrics, serve as serve_metrics
from workers.pipeline import book_tracker
from workers.pipeline.runner import BatchRunner
from workers.pipeline.task_events import TaskEvents

log = logging.getLogger(__name__)


def run_worker(settings: Settings, loglevel: str = "INFO") -> None:
    # Everything imported so far (the interpreter, torch, transformers, Celery) is the
    # first part of the cold start that autoscaling from zero and every restart pay.
    imports_s = process_age_s()
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("broker %s, storage %s, model %s", redact_url(settings.broker_url), settings.storage_url, settings.model)
    # A setup that cannot work ends the worker here, in seconds, before the model loads
    # (minutes for the real one) and before it takes a job it could not finish.
    _check_broker(settings)
    storage = storage_for(settings)
    _check_storage(settings)
    # Up before the model loads, so /healthz says 'not ready' instead of nothing.
    metrics = Metrics()
    serve_metrics(metrics, settings)
    # The model loads and warms up before the worker takes its first message. The
    # threads pool never forks, so CUDA is initialized in this one process only.
    engine = Engine(settings.model, settings.model_dir, settings.device, settings.dtype, settings.compile,
                    ModelFetch.from_settings(settings), quant=settings.quant, on_admit=faults.hook(settings.faults))
    engine.load()
    metrics.engine_ready(engine)
    t_setup = time.perf_counter()
    app = make_app(settings)
    messages, outbox = HeldMessages(), EventOutbox()
    # A store that refuses stops this worker with Celery's warm shutdown: the running batch
    # ends, every held message goes back (workers/pipeline/delivery.py).
    runner = BatchRunner(app, engine, storage, settings, metrics, messages=messages, events=TaskEvents(outbox.send),
                         stop=lambda: os.kill(os.getpid(), signal.SIGTERM))
    # Celery's consumer and kombu's Redis transport, except that a queue item that is not
    # a valid message is refused and recorded instead of stopping the worker, and a
    # fetched message is recorded as unacked in the same step (workers/broker/transport.py).
    app.conf.worker_consumer = consumer_for(runner.rejections)
    app.conf.broker_transport = transport_for(is_sentinel(settings.broker_url), runner.rejections,
                                              faults.fetch_hook(settings.faults))
    # Two batches' worth of messages: the next batch fills while the current one runs.
    app.conf.worker_prefetch_multiplier = runner.policy.prefetch
    # What it held goes back to its queue when Redis comes back without its data.
    resender = Resender(runner.redis, WORKER_QUEUES, QUEUE_BULK, messages.expect_again)
    task = register(app, runner, messages, outbox, resender)
    # A worker whose scheduler stopped ticking, or whose batch never returns, fails
    # /healthz so that its orchestrator restarts it. A batch past the visibility timeout
    # has been handed to another worker already.
    metrics.stalled = lambda: task.stalled(tick_s=60.0, batch_s=float(settings.visibility_timeout))
    try:
        # Producers check voice names against the Redis indexes (one per space): rebuilt
        # from the store here, so a flushed Redis does not make them refuse the library's voices.
        log.info("voice library: %d voices", runner.voices.library.reindex())
    except Exception as err:  # noqa: BLE001 - a worker serves seeds and speakers without it
        log.warning("could not index the voice library: %s", err)
    book_tracker.register(app, storage, runner.redis)

    def ready(**_: object) -> None:
        split = {"imports": (imports_s or 0.0) + engine.import_seconds, "model_load": engine.load_seconds,
                 "warmup": engine.warmup_seconds, "queue_setup": time.perf_counter() - t_setup}
        metrics.started(split)
        total = process_age_s()
        log.info("worker ready%s: %s", "" if total is None else f" {total:.1f} s after the process started",
                 ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in split.items()))

    worker_ready.connect(ready, weak=False)
    worker = app.Worker(
        pool="threads",
        concurrency=1,
        queues=list(WORKER_QUEUES),
        loglevel=loglevel,
        hostname=f"ttspool-{socket.gethostname()}-{os.getpid()}",
        without_gossip=True,
        without_mingle=True,
        optimization="fair",
    )
    try:
        worker.start()
    finally:
        runner.close()
    refused = runner.delivery.refused
    if refused is not None:
        # Celery sent stdout and stderr into its log: the CLI's one line goes to the real one.
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        raise StorageError(f"storage {settings.storage_url} refused an upload, so this worker stopped (its jobs "
                           f"went back to the queue): {refused}; fix: {fix_for(settings.storage_url, refused)}",
                           refused.code)
    if worker.exitcode:
        raise SystemExit(worker.exitcode)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), None where that is not known."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def _check_broker(settings: Settings) -> None:
    """The broker answers, and runs Redis 7 or newer: the fetch script (workers/broker/
    transport.py) declares itself a writer, which Redis 6 cannot parse. A Redis this
    process never reached raises redis.ConnectionError at once (tasks/broker_redis.py),
    which the CLI prints as one line with the fix."""
    r = broker_redis(settings)
    try:
        version = str(r.info("server").get("redis_version", "7"))
    except redis.ResponseError as err:  # INFO refused (some managed Redis): it answered, though
        log.warning("could not read the broker's Redis version (%s); workers need Redis 7 or newer", err)
        return
    finally:
        r.close()
    if int(version.split(".")[0]) < 7:
        raise SettingsError(f"the broker runs Redis {version}; ttspool workers need Redis 7 or newer")


def _check_storage(settings: Settings) -> None:
    """A probe object written, read back and deleted, as `ttspool doctor` does: a worker
    whose store refuses (no credentials, no bucket) or does not answer would take jobs
    it cannot finish. Two attempts, not the ten an upload gets."""
    try:
        probe(storage_for(settings, s3_max_attempts=2))
    except StorageError as err:
        raise StorageError(f"storage {settings.storage_url} is not usable: {err}; fix: "
                           f"{fix_for(settings.storage_url, err)}", err.code) from None
