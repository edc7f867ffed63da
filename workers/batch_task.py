"""`ttspool.synthesize`: from buffered broker messages to stored WAVs and recorded results."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import redis
from celery import Celery
from kombu.utils.functional import retry_over_time

from scheduler.keys import content_key, object_key
from scheduler.planner import PlanItem, Policy, next_batch
from storage import Storage, StorageError
from tasks.audio import FORMATS, duration_of, encode
from tasks.broker_redis import broker_redis
from tasks.claims import CLAIM_TTL_S, Claim, claim_key, digest_of, taken_error, tenant_of
from tasks.envelope import Rejection
from tasks.errors import JobExpired, JobFailed, RedeliveryLimit
from tasks.schema import MAX_STEPS, JobSpec, JobValidationError, parse_job
from tasks.settings import DEAD_LETTER_KEY, TASK_NAME, Settings
from tasks.states import JobState
from tasks.text.frontend import FrontEnd
from tasks.text.lengths import predicted_steps
from tasks.voices import VoiceLibrary

from . import rejections
from .batching import GpuBatches, Outcome
from .books import BookTracker
from .engine import Engine, SynthRequest
from .metrics import Metrics
from .task_events import TaskEvents
from .voices import VoiceResolver

log = logging.getLogger(__name__)

_DELIVERIES = "ttspool:deliveries:"
# Per job: GPU batches it was in that never returned (the worker died or hung in them).
_STRIKES = "ttspool:strikes:"
_OBJECTS = "ttspool:objects:"
_RECORD_TTL = 7 * 86400


@dataclass
class Job:
    id: str
    spec: JobSpec
    kwargs: dict[str, Any]
    arrived: float = field(default_factory=time.monotonic)  # when this worker took it
    key: str | None = None  # content key, once normalized
    spoken_text: str | None = None  # what the model is given, once normalized
    request: SynthRequest | None = None
    steps: int = 0  # predicted GPT steps, once normalized
    voice: dict[str, Any] | None = None  # the library voice's name and version, once resolved
    dropped: str = ""  # characters the front-end had no reading for, once normalized
    voice_wait: bool = False  # its library voice could not be read yet (logged once)
    cache_checked: bool = False
    suspect: bool = False  # was in a GPU batch that never returned: runs alone (planner)
    started: float | None = None  # when its GPU batch began (monotonic)


@dataclass
class Work:
    """One synthesis: every held job with the same content key shares it."""

    key: str
    request: SynthRequest
    jobs: list[Job] = field(default_factory=list)

    def plan_item(self, clock_offset: float) -> PlanItem["Work"]:
        """`clock_offset` turns Unix time into the monotonic clock `arrived` is on."""
        realtime = any(j.spec.priority == "realtime" for j in self.jobs)
        # The work expires only when every job sharing it has (a job without a
        # deadline still wants the audio, so the others get it at no extra cost).
        deadlines = [j.spec.deadline() for j in self.jobs]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None) + clock_offset
        return PlanItem(self, self.jobs[0].steps, "realtime" if realtime else "bulk",
                        min(j.arrived for j in self.jobs), deadline, alone=any(j.suspect for j in self.jobs))


class BatchRunner:
    """The batch function: sees every job the worker holds, runs at most one GPU batch.

    Stateful across calls only as a cache: a job admitted once (validated, delivery
    counted, normalized) is not admitted again while the worker holds its message.
    """

    def __init__(self, app: Celery, engine: Engine, storage: Storage, settings: Settings,
                 metrics: Metrics | None = None) -> None:
        self.app = app
        self.engine = engine
        self.storage = storage
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        # Retried like the producer's: a dropped connection while recording a finished
        # batch must not throw away the batch (the rows not uploaded yet, the requeue).
        self.redis = broker_redis(settings)
        self.books = BookTracker(app, self.redis)
        self.frontend = FrontEnd.from_settings(settings)
        self.voices = VoiceResolver(VoiceLibrary(storage, self.redis), engine, self._read_text,
                                    ttl_s=settings.voice_cache_s)
        self.policy = Policy(
            max_batch=settings.max_batch,
            # Steps one GPU batch may hold (sum of predicted lengths): half the rows at
            # the longest length, so a batch of long jobs stays within memory.
            token_budget=max(MAX_STEPS, settings.max_batch * MAX_STEPS // 2),
            max_wait_s=settings.max_wait_ms / 1000.0,
            aging_s=settings.aging_ms / 1000.0,
        )
        self._jobs: dict[str, Job] = {}
        self.events = TaskEvents()  # register() connects it to the worker's event dispatcher
        # Storage lookups of the jobs that arrived in one tick run side by side: one at a
        # time, a tick that took 16 jobs waited 16 storage round trips.
        self._lookups = ThreadPoolExecutor(max_workers=8, thread_name_prefix="cache-lookup")
        self._refused_since: float | None = None  # Redis has refused writes since then

    # -- results ------------------------------------------------------------------

    def _fail(self, job_id: str, exc: Exception) -> None:
        log.info("job %s failed: %s", job_id, exc)
        self.app.backend.mark_as_failure(job_id, exc)
        self.events.failed(job_id, exc)
        self.books.job_finished(job_id, error=f"{type(exc).__name__}: {exc}")
        self.metrics.job_failed(exc)

    def _succeed(self, job: Job, record: dict[str, Any], cached: bool) -> None:
        result = {"id": job.id, "status": JobState.SUCCESS, **record, "spoken_text": job.spoken_text,
                  "cached": cached, **({"voice": job.voice} if job.voice is not None else {}),
                  **({"dropped": job.dropped} if job.dropped else {})}
        self.app.backend.mark_as_done(job.id, result)
        self.events.succeeded(job.id, result, 0.0 if job.started is None else time.monotonic() - job.started)
        self.books.job_finished(job.id, duration_s=record["duration_s"])
        self.metrics.job_succeeded(job.spec, cached)

    # -- the batch ----------------------------------------------------------------

    def __call__(self, requests: Sequence[Any]) -> Outcome:
        """Called with every held request; returns which are finished or to requeue."""
        out = Outcome()
        held = {r.id: r for r in requests}
        # A job stays admitted while the same message is held: another message now held
        # under its id (one that won the id's claim) is admitted afresh.
        self._jobs = {k: v for k, v in self._jobs.items() if k in held and v.kwargs == held[k].kwargs}
        try:
            new = [r for r in requests if r.id not in self._jobs]
            for job in self._admit(new, out):
                self._jobs[job.id] = job
            works = self._group(out)
            fresh = self._serve_cached(works, out)
            now = time.monotonic()
            offset = now - time.time()
            decision = next_batch([w.plan_item(offset) for w in fresh], now, self.policy)
            for item in decision.expired:
                self._expire(item.payload, now, out)
            if decision.batch:
                self._run([item.payload for item in decision.batch], out)
            self._refused_since = None
        except redis.exceptions.OutOfMemoryError as err:
            # The broker is at maxmemory: results, strikes and requeues are refused. What
            # is recorded stays recorded (acked below); everything else stays held and is
            # tried again after a pause. Audio already uploaded is found in storage then.
            self._back_off(err)
        except BaseException:
            # Every held message goes back (workers.batching); a batch may have stored some
            # of its audio before this: look in storage again when they return, rather
            # than synthesize it a second time.
            self._recheck_storage()
            raise
        finally:
            for job_id in out.finished | out.requeue:
                self._jobs.pop(job_id, None)
        if out.requeue:
            log.warning("requeueing %d unfinished job(s)", len(out.requeue))
            self._mark_queued(out.requeue)
            for job_id in out.requeue:
                self.events.requeued(job_id)
        return out

    def _mark_queued(self, job_ids: set[str]) -> None:
        """Back to the queue: the job's state says so (not STARTED) while it waits again."""
        try:
            for job_id in job_ids:
                self.app.backend.store_result(job_id, {"id": job_id}, JobState.PENDING)
        except redis.RedisError as err:
            log.warning("could not mark requeued jobs as queued: %s", err)

    def _back_off(self, err: Exception) -> None:
        now = time.monotonic()
        if self._refused_since is None:
            self._refused_since = now
            log.error("the broker refuses writes (%s); holding %d job(s) and retrying", err, len(self._jobs))
        self.metrics.broker_refusals.inc()
        self._recheck_storage()
        # Growing pauses, up to 10 s, while the batch counts as in flight (no new flush).
        time.sleep(min(10.0, 0.5 + (now - self._refused_since) / 4))

    def _recheck_storage(self) -> None:
        for job in self._jobs.values():
            job.cache_checked = False

    def _admit(self, requests: Sequence[Any], out: Outcome) -> list[Job]:
        """Check each message's claim on its id; validate; count deliveries. A bad one
        fails alone, and only under an id that is its own."""
        jobs: list[Job] = []
        for req in self._owned(requests, out):
            self.events.received(req.id, req.kwargs)
            try:
                if req.args:
                    raise JobValidationError("ttspool.synthesize takes keyword arguments only")
                spec = parse_job(req.kwargs)
            except JobValidationError as err:
                self._fail(req.id, err)
                out.finished.add(req.id)
                continue
            if spec.job_id is not None and spec.job_id != req.id:
                # Recorded under one id, the other would stay PENDING forever.
                rejections.record(Rejection("id_mismatch", f"kwargs job_id {spec.job_id!r} differs from the "
                                                           f"message id {req.id!r}", req.id),
                                  json.dumps(req.kwargs, default=str), owner=True)
                out.finished.add(req.id)
                continue
            jobs.append(Job(req.id, spec, dict(req.kwargs)))
        if not jobs:
            return []
        pipe = self.redis.pipeline()
        for job in jobs:
            pipe.incr(_DELIVERIES + job.id)
            pipe.expire(_DELIVERIES + job.id, _RECORD_TTL)
            pipe.get(_STRIKES + job.id)
        replies = pipe.execute()
        admitted = []
        for job, count, raw_strikes in zip(jobs, replies[::3], replies[2::3]):
            strikes = int(raw_strikes or 0)
            if count > 1 and self._has_result(job.id):
                # Redelivered after its result was recorded (the worker died or Redis
                # restarted before the ack): report it once, do not run it again.
                out.finished.add(job.id)
            elif strikes >= self.settings.max_strikes:
                # Counted in GPU batches that never returned, not in deliveries: jobs that
                # only shared a batch (or a buffer) with a crashing job are not blamed.
                reason = RedeliveryLimit(
                    f"job was in {strikes} GPU batches that never finished (the worker died "
                    f"or hung each time; limit {self.settings.max_strikes}); moved to {DEAD_LETTER_KEY}"
                )
                self.redis.lpush(DEAD_LETTER_KEY, json.dumps({"id": job.id, "kwargs": job.kwargs, "reason": str(reason), "at": time.time()}))
                self._fail(job.id, reason)
                out.finished.add(job.id)
            else:
                job.suspect = strikes > 0
                self.app.backend.store_result(job.id, {"id": job.id}, JobState.STARTED)
                admitted.append(job)
        return admitted

    @staticmethod
    def _claim_of(kwargs: Any) -> Claim:
        """The claim a message makes on its id: the digest of its kwargs as received."""
        return Claim(digest_of(kwargs), tenant_of(kwargs), "worker")

    def owns(self, job_id: str, kwargs: Any) -> bool:
        """Whether this job is the one its id's claim names (an unclaimed id: yes)."""
        try:
            raw = self.redis.get(claim_key(job_id))
        except redis.RedisError:
            return False
        return raw is None or Claim.decode(raw).same_job(self._claim_of(kwargs))

    def refuse(self, request: Any) -> None:
        """A message that lost its id to a different job: dead-lettered, the owner untouched."""
        rejections.record(Rejection("id_taken", taken_error(request.id), None), json.dumps(request.kwargs, default=str))

    def _owned(self, requests: Sequence[Any], out: Outcome) -> list[Any]:
        """Requests whose id is theirs: claimed here when unclaimed (a plain Celery client),
        refused when claimed by a different job, without touching that job's record."""
        if not requests:
            return []
        pipe = self.redis.pipeline(transaction=False)
        claims = [self._claim_of(req.kwargs) for req in requests]
        for req, claim in zip(requests, claims):
            pipe.set(claim_key(req.id), claim.encode(), nx=True, ex=CLAIM_TTL_S)
            pipe.get(claim_key(req.id))
        replies = pipe.execute()
        owned = []
        for req, claim, raw in zip(requests, claims, replies[1::2]):
            if raw is None or Claim.decode(raw).same_job(claim):
                owned.append(req)
                continue
            self.refuse(req)
            out.finished.add(req.id)
        return owned

    def _has_result(self, job_id: str) -> bool:
        return self.app.backend.get_task_meta(job_id).get("status") in (JobState.SUCCESS, JobState.FAILURE)

    def _strike(self, batch: list[Work], n: int) -> None:
        pipe = self.redis.pipeline()
        for job in (j for w in batch for j in w.jobs):
            pipe.incrby(_STRIKES + job.id, n)
            pipe.expire(_STRIKES + job.id, _RECORD_TTL)
        pipe.execute()

    def _expire(self, work: Work, now: float, out: Outcome) -> None:
        """Past its deadline: nobody waits for it any more, so it ends without the GPU."""
        for job in work.jobs:
            self._fail(job.id, JobExpired(f"deadline passed before the job could run (held {now - job.arrived:.1f} s)"))
            out.finished.add(job.id)

    def _group(self, out: Outcome) -> list[Work]:
        """Normalize each held job (once) and merge jobs with the same content key."""
        works: dict[str, Work] = {}
        for job in self._jobs.values():
            if job.id in out.finished:
                continue
            if job.key is None or job.request is None:
                s = job.spec
                try:
                    text = self.engine.normalize(self._spoken(job))
                    if not text.strip():
                        raise JobFailed("text is empty after normalization (no speakable characters)", reason="empty_text")
                    voice = self.voices.resolve(s.voice, s.voice_name)
                except JobFailed as err:
                    self._fail(job.id, err)
                    out.finished.add(job.id)
                    continue
                except StorageError as err:
                    # The voice library is unreadable just now: the job waits (held) and is
                    # looked at again next tick, like an upload that waits for storage.
                    if not job.voice_wait:
                        log.warning("job %s waits for its voice %r: %s", job.id, s.voice_name, err)
                    job.voice_wait = True
                    continue
                job.spoken_text = text
                job.voice = voice.label
                job.key = object_key(content_key(self.engine.model_id, text, {**s.sampling_params(), "voice": voice.key}),
                                     FORMATS[s.format].extension)
                job.request = SynthRequest(text=text, voice=voice.voice, seed=s.seed, speed=s.speed,
                                           temperature=float(s.temperature), top_p=float(s.top_p),
                                           top_k=s.top_k, max_tokens=s.max_tokens)
                # Predicted once: the scheduler asks for it on every tick.
                job.steps = predicted_steps(text, s.speed, s.max_tokens)
            works.setdefault(job.key, Work(job.key, job.request)).jobs.append(job)
        return list(works.values())

    def _read_text(self, text: str) -> str:
        """A text as the model is given it (a recording voice's transcript)."""
        return self.engine.normalize(self.frontend.speak(text, "auto", True).spoken_text)

    def _spoken(self, job: Job) -> str:
        """The text front-end: numbers, money, dates ... as words (tasks/text/frontend.py)."""
        t0 = time.perf_counter()
        try:
            spoken = self.frontend.speak(job.spec.text, job.spec.lang, job.spec.normalize)
        except Exception as err:
            # A rule that breaks on some text must cost that job only, never the worker.
            log.exception("job %s: the text front-end failed", job.id)
            raise JobFailed(f"the text front-end failed on this text ({type(err).__name__})",
                            reason="text_frontend") from None
        self.metrics.frontend_seconds.observe(time.perf_counter() - t0)
        job.dropped = spoken.dropped
        if spoken.dropped:
            log.warning("job %s: left out %d character(s) with no reading: %s", job.id, spoken.dropped_count,
                        ascii(spoken.dropped))
            self.metrics.text_dropped.inc(spoken.dropped_count)
            self.metrics.text_jobs_dropped.inc()
        return spoken.spoken_text

    def _run(self, batch: list[Work], out: Outcome) -> None:
        # A strike for every job in the GPU batch, taken back when the batch returns:
        # only a batch the worker dies (or hangs past the visibility timeout) in leaves one.
        self._strike(batch, 1)
        timer = self.metrics.batch_started([j.spec for w in batch for j in w.jobs])
        started = time.monotonic()
        for work in batch:
            for job in work.jobs:
                job.started = started
                self.events.started(job.id)
        results = self.engine.generate([w.request for w in batch])
        timer.generated(results, self.engine.sample_rate)
        try:
            self._strike(batch, -1)
        except redis.exceptions.OutOfMemoryError as err:
            # The audio is made: store it before anything else, or it is lost with the
            # refusal. The strike stays; the job would run alone if it came back.
            log.warning("could not take back the batch's strikes (%s); storing its audio first", err)
        # Every row's audio is stored before any result is recorded: when Redis refuses
        # the records (maxmemory), what was made is in storage and served from there later.
        stored: list[tuple[Work, dict[str, Any]]] = []
        failed: list[tuple[Work, str]] = []
        # One retry budget for the whole batch: per row, a batch of 16 rows held the
        # worker for 16 budgets (plus boto3's own retries each) while storage was down.
        # Once a row has used it up, storage is down: the rows left go back untried.
        deadline = time.monotonic() + self.settings.upload_retry_s
        untried: list[Work] = []
        for work, res in zip(batch, results, strict=True):
            if res.audio is None:
                failed.append((work, res.error or "synthesis failed"))
            elif untried:
                untried.append(work)
            else:
                try:
                    stored.append((work, self._store_patiently(work.key, res.audio, work.jobs[0].spec.format,
                                                               deadline)))
                except StorageError as err:
                    log.warning("upload failed, will retry: %s", err)
                    untried.append(work)
        if len(untried) > 1:
            log.warning("storage is down: %d more row(s) of this batch go back to the queue untried",
                        len(untried) - 1)
        for work in untried:
            out.requeue |= {job.id for job in work.jobs}
        for work, error in failed:
            for job in work.jobs:
                self._fail(job.id, JobFailed(error))
            out.finished |= {job.id for job in work.jobs}
        for work, record in stored:
            for job in work.jobs:
                self._succeed(job, record, cached=False)
            out.finished |= {job.id for job in work.jobs}
        timer.finished()

    def _store_patiently(self, key: str, audio: Any, fmt: str, deadline: float) -> dict[str, Any]:
        """Upload, retrying with growing pauses until `deadline` (monotonic; one try if it
        has passed): a storage outage then costs time instead of a requeue and a second
        synthesis of the same audio."""

        def pause(err: Exception, intervals: Iterator[float], retries: int) -> float:
            wait = next(intervals)
            log.warning("upload failed (try %d), retrying in %.0f s: %s", retries + 1, wait, err)
            return wait

        budget = max(0.0, deadline - time.monotonic())
        record: dict[str, Any] = retry_over_time(
            self._store, StorageError, (key, audio, fmt), errback=pause, max_retries=None if budget else 0,
            interval_start=1, interval_step=2, interval_max=10, timeout=budget,
        )
        return record

    def _store(self, key: str, audio: Any, fmt: str) -> dict[str, Any]:
        data, rate, seconds = encode(audio, self.engine.sample_rate, fmt)
        with self.metrics.upload_seconds.time():
            url = self.storage.put_bytes(key, data, FORMATS[fmt].content_type)
        record = {"url": url, "key": key, "duration_s": round(seconds, 6), "sample_rate": rate, "format": fmt}
        try:
            self.redis.set(_OBJECTS + key, json.dumps(record), ex=_RECORD_TTL)
        except redis.exceptions.OutOfMemoryError:
            pass  # only an index: a cache lookup without it asks storage
        return record

    def _serve_cached(self, works: list[Work], out: Outcome) -> list[Work]:
        """Serve from storage every work whose exact output exists already (no GPU); the
        rest, to synthesize. Each job is looked up once, not on every scheduler tick: the
        new ones' index records in one Redis round trip, then storage for all of them at
        once (an index record may outlive its object: a bucket lifecycle rule)."""
        new = [w for w in works if not all(j.cache_checked for j in w.jobs)]
        if not new:
            return works
        for work in new:
            for job in work.jobs:
                job.cache_checked = True
        records = self.redis.mget([_OBJECTS + w.key for w in new])
        found = dict(zip((w.key for w in new), self._lookups.map(self._stored_record, new, records)))
        rest = []
        for work in works:
            record = found.get(work.key)
            if record is None:
                rest.append(work)
                continue
            for job in work.jobs:
                self._succeed(job, record, cached=True)
                out.finished.add(job.id)
        return rest

    def _stored_record(self, work: Work, raw: bytes | None) -> dict[str, Any] | None:
        try:
            if raw is not None:
                return json.loads(raw) if self.storage.exists(work.key) else None
            if not self.storage.exists(work.key):
                return None
            fmt = work.jobs[0].spec.format
            duration, sr = duration_of(self.storage.get_bytes(work.key), fmt, self.engine.sample_rate)
            return {"url": self.storage.url_for(work.key), "key": work.key,
                    "duration_s": round(duration, 6), "sample_rate": sr, "format": fmt}
        except Exception as err:  # noqa: BLE001 - a bad record or object costs a synthesis, not the tick
            # StorageError (an outage), and also a corrupt index record or a stored object
            # that does not decode: raised out of the tick, either would requeue every
            # held job, and the same lookup would fail again on redelivery, forever.
            log.warning("cache lookup of %s failed, synthesizing instead: %s", work.key, err)
            return None


def register(app: Celery, runner: BatchRunner, settings: Settings) -> GpuBatches:
    @app.task(
        name=TASK_NAME,
        base=GpuBatches,
        bind=False,
        acks_late=True,
        flush_every=settings.max_batch,
        # The scheduler's clock: held jobs are looked at again on every tick.
        flush_interval=max(10, min(settings.max_wait_ms, 50)) / 1000.0,
    )
    def synthesize(requests: Sequence[Any]) -> Outcome:
        return runner(requests)

    task: GpuBatches = app.tasks[TASK_NAME]
    task.owns = runner.owns
    task.refuse = runner.refuse
    runner.events = TaskEvents(task.send_event)
    return task
