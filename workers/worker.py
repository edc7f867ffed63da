"""`ttspool worker`: one process, one GPU, one engine, one batch at a time."""

from __future__ import annotations

import logging
import os
import socket

from storage import open_storage
from tasks.app import make_app
from tasks.settings import QUEUES, Settings, redact_url

from . import batch_task
from .engine import Engine

log = logging.getLogger(__name__)


def run_worker(settings: Settings, loglevel: str = "INFO") -> None:
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("broker %s, storage %s, model %s", redact_url(settings.broker_url), settings.storage_url, settings.model)
    storage = open_storage(settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url)
    # The model loads and warms up before the worker takes its first message. The
    # threads pool never forks, so CUDA is initialized in this one process only.
    engine = Engine(settings.model, settings.model_dir, settings.device, settings.dtype).load()
    app = make_app(settings, worker_consumer="workers.consumer:Consumer")
    runner = batch_task.BatchRunner(app, engine, storage, settings)
    batch_task.register(app, runner, settings)
    worker = app.Worker(
        pool="threads",
        concurrency=1,
        queues=list(QUEUES),
        loglevel=loglevel,
        hostname=f"ttspool-{socket.gethostname()}-{os.getpid()}",
        without_gossip=True,
        without_mingle=True,
        optimization="fair",
    )
    worker.start()
    if worker.exitcode:
        raise SystemExit(worker.exitcode)
