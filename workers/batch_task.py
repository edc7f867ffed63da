"""`ttspool.synthesize`: from buffered broker messages to stored WAVs and recorded results."""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import redis
from celery import Celery

from scheduler.keys import content_key, object_key
from scheduler.lengths import predicted_steps
from scheduler.planner import PlanItem, plan_batches
from storage import Storage, StorageError
from tasks.errors import JobFailed, RedeliveryLimit
from tasks.schema import JobSpec, JobValidationError, parse_job
from tasks.settings import TASK_NAME, Settings

from .audio import wav_bytes, wav_duration
from .batching import GpuBatches
from .engine import Engine, SynthRequest

log = logging.getLogger(__name__)

DEAD_LETTER_KEY = "ttspool:dead"
_DELIVERIES = "ttspool:deliveries:"
_OBJECTS = "ttspool:objects:"
_RECORD_TTL = 7 * 86400


@dataclass
class Job:
    id: str
    spec: JobSpec
    kwargs: dict[str, Any]


@dataclass
class Work:
    """One synthesis: every job with the same content key shares it."""

    key: str
    request: SynthRequest
    priority: str
    jobs: list[Job] = field(default_factory=list)


class BatchRunner:
    def __init__(self, app: Celery, engine: Engine, storage: Storage, settings: Settings) -> None:
        self.app = app
        self.engine = engine
        self.storage = storage
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.broker_url, socket_timeout=10, socket_connect_timeout=5)
        # Upper bound on the steps one GPU batch may hold (sum of predicted lengths).
        self.token_budget = settings.max_batch * 1024

    # -- results ------------------------------------------------------------------

    def _fail(self, job_id: str, exc: Exception) -> None:
        log.info("job %s failed: %s", job_id, exc)
        self.app.backend.mark_as_failure(job_id, exc)

    def _succeed(self, job: Job, record: dict[str, Any], cached: bool) -> None:
        self.app.backend.mark_as_done(
            job.id, {"id": job.id, "status": "SUCCESS", **record, "cached": cached}
        )

    # -- the batch ----------------------------------------------------------------

    def __call__(self, requests: Sequence[Any]) -> set[str]:
        """Run one flush; return the ids to requeue (their messages are not acked)."""
        jobs = self._admit(requests)
        unfinished: set[str] = set()
        if jobs:
            self._run(jobs, unfinished)
        if unfinished:
            log.warning("requeueing %d unfinished job(s)", len(unfinished))
        return unfinished

    def _admit(self, requests: Sequence[Any]) -> list[Job]:
        """Validate every message; count deliveries; a bad one fails alone."""
        jobs: list[Job] = []
        for req in requests:
            try:
                if req.args:
                    raise JobValidationError("ttspool.synthesize takes keyword arguments only")
                spec = parse_job(req.kwargs)
            except JobValidationError as err:
                self._fail(req.id, err)
                continue
            jobs.append(Job(req.id, spec, dict(req.kwargs)))
        if not jobs:
            return []
        pipe = self.redis.pipeline()
        for job in jobs:
            pipe.incr(_DELIVERIES + job.id)
            pipe.expire(_DELIVERIES + job.id, _RECORD_TTL)
        counts = pipe.execute()[::2]
        admitted = []
        for job, count in zip(jobs, counts):
            if count > self.settings.max_deliveries:
                reason = RedeliveryLimit(
                    f"job was delivered {count} times without finishing (limit "
                    f"{self.settings.max_deliveries}); moved to {DEAD_LETTER_KEY}"
                )
                self.redis.lpush(DEAD_LETTER_KEY, json.dumps({"id": job.id, "kwargs": job.kwargs, "reason": str(reason), "at": time.time()}))
                self._fail(job.id, reason)
            else:
                self.app.backend.store_result(job.id, {"id": job.id}, "STARTED")
                admitted.append(job)
        return admitted

    def _run(self, jobs: list[Job], unfinished: set[str]) -> None:
        works: dict[str, Work] = {}
        for job in jobs:
            s = job.spec
            try:
                text = self.engine.normalize(s.text)
                if not text.strip():
                    raise JobFailed("text is empty after normalization (no speakable characters)")
                if isinstance(s.voice, str):
                    self.engine.speaker(s.voice)
            except (JobFailed, ValueError) as err:
                self._fail(job.id, err if isinstance(err, JobFailed) else JobFailed(str(err)))
                continue
            key = object_key(content_key(self.engine.model_id, text, s.sampling_params()))
            if key not in works:
                req = SynthRequest(text=text, voice=s.voice, seed=s.seed, speed=s.speed,
                                   temperature=float(s.temperature), top_p=float(s.top_p),
                                   top_k=s.top_k, max_tokens=s.max_tokens)
                works[key] = Work(key, req, s.priority)
            elif s.priority == "realtime":
                works[key].priority = "realtime"
            works[key].jobs.append(job)

        fresh = [w for w in works.values() if not self._serve_cached(w)]
        items = [PlanItem(w, predicted_steps(w.request.text, w.request.speed, w.request.max_tokens), w.priority) for w in fresh]
        for batch in plan_batches(items, self.settings.max_batch, self.token_budget):
            results = self.engine.generate([i.payload.request for i in batch])
            for item, res in zip(batch, results, strict=True):
                work = item.payload
                if res.audio is None:
                    for job in work.jobs:
                        self._fail(job.id, JobFailed(res.error or "synthesis failed"))
                    continue
                try:
                    record = self._store(work.key, res.audio)
                except StorageError as err:
                    log.warning("upload failed, will retry: %s", err)
                    unfinished.update(job.id for job in work.jobs)
                    continue
                for job in work.jobs:
                    self._succeed(job, record, cached=False)

    def _store(self, key: str, audio: Any) -> dict[str, Any]:
        sr = self.engine.sample_rate
        url = self.storage.put_bytes(key, wav_bytes(audio, sr), "audio/wav")
        record = {"url": url, "key": key, "duration_s": round(len(audio) / sr, 6), "sample_rate": sr}
        self.redis.set(_OBJECTS + key, json.dumps(record), ex=_RECORD_TTL)
        return record

    def _serve_cached(self, work: Work) -> bool:
        """Serve from storage when this exact output exists already (no GPU)."""
        raw = self.redis.get(_OBJECTS + work.key)
        try:
            if raw is not None:
                record = json.loads(raw)
                if not self.storage.exists(work.key):
                    return False
            elif self.storage.exists(work.key):
                duration, sr = wav_duration(self.storage.get_bytes(work.key))
                record = {"url": self.storage.url_for(work.key), "key": work.key,
                          "duration_s": round(duration, 6), "sample_rate": sr}
            else:
                return False
        except StorageError as err:
            log.warning("cache lookup failed, synthesizing instead: %s", err)
            return False
        for job in work.jobs:
            self._succeed(job, record, cached=True)
        return True


def register(app: Celery, runner: BatchRunner, settings: Settings) -> None:
    @app.task(
        name=TASK_NAME,
        base=GpuBatches,
        bind=False,
        acks_late=True,
        flush_every=settings.max_batch,
        flush_interval=max(settings.max_wait_ms, 10) / 1000.0,
    )
    def synthesize(requests: Sequence[Any]) -> set[str]:
        return runner(requests)
