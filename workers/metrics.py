"""Worker metrics (Prometheus) and health, served on TTSPOOL_METRICS_PORT.

One worker process owns one GPU and one registry, so prometheus_client's plain
(single-process) mode is right: the threads pool never forks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector,
                               ProcessCollector)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from storage.models.fetch_progress import FETCH_BYTES
from tasks.broker_redis import redis_client
from tasks.errors import JobExpired, JobFailed, RedeliveryLimit, SettingsError
from tasks.metrics_http import start_server
from tasks.schema import JobSpec, JobValidationError
from tasks.settings import QUEUE_BULK, QUEUE_REALTIME, Settings

if TYPE_CHECKING:
    import torch

    from .engine.engine import Engine

    from .engine.requests import SynthResult

log = logging.getLogger(__name__)

RECENT_WINDOW_S = 60.0
# Seconds, from a cache hit's few milliseconds to a long bulk job's hour in the queue.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
_BATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, float("inf"))
_UPLOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf"))
_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, float("inf"))
_FRONTEND_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, float("inf"))


def failure_labels(exc: BaseException) -> tuple[str, str]:
    """(status, reason) for a job that ended with `exc`: fixed words, never the message."""
    if isinstance(exc, JobExpired):
        return "expired", "deadline"
    if isinstance(exc, JobValidationError):
        return "failure", "invalid"
    if isinstance(exc, RedeliveryLimit):
        return "failure", "redelivery_limit"
    if isinstance(exc, JobFailed):
        return "failure", getattr(exc, "reason", "synthesis")
    return "failure", "error"


def queue_of(spec: JobSpec) -> str:
    return QUEUE_REALTIME if spec.priority == "realtime" else QUEUE_BULK


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        # The model is fetched (on first use) in this process, before it takes jobs.
        r.register(FETCH_BYTES)
        self.jobs = Counter("ttspool_jobs", "Jobs finished, by status (success, failure, expired) and reason",
                            ["status", "reason"], registry=r)
        # Series that exist from the start, so rate() and ratios see their first event.
        for status, reason in (("success", "synthesized"), ("success", "cache_hit"),
                               ("failure", "synthesis"), ("expired", "deadline")):
            self.jobs.labels(status, reason)
        self.batches = Counter("ttspool_batches", "GPU batches run", registry=r)
        self.batch_size = Histogram("ttspool_batch_size", "Rows (distinct syntheses) per GPU batch",
                                    buckets=_SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("ttspool_batch_seconds", "Wall time of a GPU batch: inference, uploads, results",
                                       buckets=_BATCH_BUCKETS, registry=r)
        self.inference_seconds = Histogram("ttspool_inference_seconds", "Engine time (generation and decoding) per GPU batch",
                                           buckets=_BATCH_BUCKETS, registry=r)
        self.upload_seconds = Histogram("ttspool_upload_seconds", "Time to store one WAV",
                                        buckets=_UPLOAD_BUCKETS, registry=r)
        self.queue_wait = Histogram("ttspool_queue_wait_seconds", "From enqueue to the start of the job's GPU batch",
                                    ["queue"], buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("ttspool_job_latency_seconds", "From enqueue to the recorded result, successful jobs",
                                 ["queue"], buckets=_LATENCY_BUCKETS, registry=r)
        self.text_dropped = Counter("ttspool_text_dropped_characters",
                                    "Characters the text front-end had no reading for and left out", registry=r)
        self.text_jobs_dropped = Counter("ttspool_text_jobs_with_dropped_characters",
                                         "Jobs whose text lost at least one character with no reading", registry=r)
        self.frontend_seconds = Histogram("ttspool_text_frontend_seconds", "Text front-end time per job",
                                          buckets=_FRONTEND_BUCKETS, registry=r)
        self.rejected = Counter("ttspool_rejected_messages", "Queue items refused without running, by reason "
                                "(tasks/envelope.py: no_id, bad_id, eta, body, undecodable ...)", ["reason"], registry=r)
        self.broker_refusals = Counter("ttspool_broker_refused_writes",
                                       "Scheduler ticks the broker's Redis refused a write in (out of memory)", registry=r)
        self.store_wait_seconds = Counter(
            "ttspool_store_wait_seconds", "Time the GPU thread waited for the store stage to take a finished "
            "row (back-pressure from slow storage)", registry=r)
        self.steps = Counter("ttspool_steps", "GPT steps generated (46.875 per second of audio)", registry=r)
        self.audio = Counter("ttspool_audio_seconds", "Seconds of audio synthesized", registry=r)
        recent = Gauge("ttspool_recent_audio_seconds_per_second",
                       "Audio seconds synthesized per second over the last minute", registry=r)
        recent.set_function(self.recent_throughput)
        self.load_seconds = Gauge("ttspool_model_load_seconds", "Time to load the model", registry=r)
        self.warmup_seconds = Gauge("ttspool_model_warmup_seconds", "Time of the warm-up batch", registry=r)
        self.start_seconds = Gauge("ttspool_worker_start_seconds", "Cold start of this worker process, by phase: "
                                   "imports, model_load, warmup, queue_setup", ["phase"], registry=r)
        self.model_loaded = Gauge("ttspool_model_loaded", "1 once the model is loaded and warmed up", registry=r)
        self.info = Info("ttspool_worker", "Model, dtype, weight quantization, device and ttspool version of this worker",
                         registry=r)
        self.ready = False  # model loaded and warmed up
        # Why the worker is stuck (its scheduler loop), or None: set once it serves jobs.
        self.stalled: Callable[[], str | None] = lambda: None
        self._recent: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    # -- events ---------------------------------------------------------------------

    def engine_ready(self, engine: "Engine") -> None:
        self.load_seconds.set(engine.load_seconds)
        self.warmup_seconds.set(engine.warmup_seconds)
        self.info.info({"model": engine.model_id, "dtype": str(engine.dtype).removeprefix("torch."),
                        "quant": engine.quant, "device": str(engine.device), "version": _version()})
        if engine.device.type == "cuda":
            self.registry.register(TorchMemory(engine.device))
            nvml = NvmlGpu.open(engine.device)
            if nvml is not None:
                self.registry.register(nvml)
        self.model_loaded.set(1)
        self.ready = True

    def started(self, split: dict[str, float]) -> None:
        for phase, seconds in split.items():
            self.start_seconds.labels(phase).set(seconds)

    def job_succeeded(self, spec: JobSpec, cached: bool) -> None:
        self.jobs.labels("success", "cache_hit" if cached else "synthesized").inc()
        if spec.enqueued_at is not None:
            self.latency.labels(queue_of(spec)).observe(max(0.0, time.time() - spec.enqueued_at))

    def job_failed(self, exc: BaseException) -> None:
        self.jobs.labels(*failure_labels(exc)).inc()

    def batch_started(self) -> "BatchTimer":
        return BatchTimer(self)

    def audio_done(self, seconds: float) -> None:
        self.audio.inc(seconds)
        with self._lock:
            now = time.monotonic()
            self._recent.append((now, seconds))
            # Pruned here too, not only when scraped: a worker nobody scrapes (no Prometheus
            # yet, a broken scrape config) kept one entry per row for its lifetime.
            self._forget_before(now - RECENT_WINDOW_S)

    def recent_throughput(self) -> float:
        with self._lock:
            self._forget_before(time.monotonic() - RECENT_WINDOW_S)
            return sum(s for _, s in self._recent) / RECENT_WINDOW_S

    def _forget_before(self, start: float) -> None:
        while self._recent and self._recent[0][0] < start:
            self._recent.popleft()


class BatchTimer:
    """One GPU batch, from `Metrics.batch_started` to `finished`; rows join it (`started`)
    when it starts and whenever a free row is refilled, and leave it one by one (`row`)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.t0 = time.perf_counter()
        self.rows = 0

    def started(self, specs: Sequence[JobSpec]) -> None:
        now = time.time()
        for spec in specs:
            if spec.enqueued_at is not None:
                self.metrics.queue_wait.labels(queue_of(spec)).observe(max(0.0, now - spec.enqueued_at))

    def row(self, result: "SynthResult", sample_rate: int) -> None:
        self.rows += 1
        self.metrics.steps.inc(result.steps)
        if result.audio is not None:
            self.metrics.audio_done(len(result.audio) / sample_rate)

    def generated(self) -> None:
        m = self.metrics
        m.inference_seconds.observe(time.perf_counter() - self.t0)
        m.batches.inc()
        m.batch_size.observe(self.rows)

    def finished(self) -> None:
        self.metrics.batch_seconds.observe(time.perf_counter() - self.t0)


class TorchMemory(Collector):
    """The CUDA caching allocator's view of this worker's GPU."""

    def __init__(self, device: "torch.device") -> None:
        self.device = device

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        for name, doc, value in (
            ("ttspool_gpu_memory_allocated_bytes", "GPU memory held by tensors (torch)", torch.cuda.memory_allocated),
            ("ttspool_gpu_memory_reserved_bytes", "GPU memory reserved by torch's allocator", torch.cuda.memory_reserved),
        ):
            family = GaugeMetricFamily(name, doc, labels=["device"])
            family.add_metric([str(self.device)], value(self.device))
            yield family


class NvmlGpu(Collector):
    """Utilization and memory of this worker's GPU as the driver sees it (all processes)."""

    def __init__(self, nvml: Any, handle: Any, index: int, uuid: str) -> None:
        self.nvml, self.handle, self.labels = nvml, handle, [str(index), uuid]

    @classmethod
    def open(cls, device: "torch.device") -> "NvmlGpu | None":
        """None when nvidia-ml-py or the driver's NVML is missing, or the GPU is not found."""
        import torch

        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            # Match by UUID: CUDA_VISIBLE_DEVICES renumbers devices, NVML does not.
            want = str(torch.cuda.get_device_properties(device).uuid)
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
                if uuid.removeprefix("GPU-") == want.removeprefix("GPU-"):
                    return cls(pynvml, handle, i, uuid)
        except (pynvml.NVMLError, RuntimeError, AttributeError) as err:
            log.info("no NVML GPU metrics: %s", err)
        return None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu / 100.0
            mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        except self.nvml.NVMLError:
            return  # a GPU that stops answering drops out of the scrape, it does not break it
        for name, doc, value in (
            ("ttspool_gpu_utilization_ratio", "GPU busy fraction over the driver's last sample period", util),
            ("ttspool_gpu_memory_used_bytes", "GPU memory used by all processes (NVML)", mem.used),
            ("ttspool_gpu_memory_total_bytes", "GPU memory in total (NVML)", mem.total),
        ):
            family = GaugeMetricFamily(name, doc, labels=["gpu", "uuid"])
            family.add_metric(self.labels, value)
            yield family


def _version() -> str:
    try:
        return version("ttspool")
    except PackageNotFoundError:
        return "unknown"


def serve(metrics: Metrics, settings: Settings) -> WSGIServer | None:
    """Start /metrics and /healthz unless TTSPOOL_METRICS_PORT is 0."""
    if not settings.metrics_port:
        return None
    broker = redis_client(settings.broker_url, settings.redis_master_name, socket_timeout=1, socket_connect_timeout=1,
                                  retry=Retry(NoBackoff(), 0))

    def healthz() -> tuple[int, dict[str, Any]]:
        try:
            broker_ok = bool(broker.ping())
        except (redis.RedisError, OSError):
            broker_ok = False
        stalled = metrics.stalled()
        body: dict[str, Any] = {"model_loaded": metrics.ready, "broker": broker_ok, "scheduler": stalled or "ok"}
        return (200 if metrics.ready and broker_ok and stalled is None else 503), body

    try:
        server = start_server(metrics.registry, settings.metrics_addr, settings.metrics_port, {"/healthz": healthz})
    except RuntimeError as err:  # most often a second worker on this host, on the same port
        raise SettingsError(f"{err}; give each worker on a host its own port: TTSPOOL_METRICS_PORT "
                            "(0 serves no metrics)") from None
    log.info("metrics on http://%s:%d/metrics, health on /healthz", settings.metrics_addr, server.server_port)
    return server
