"""The producer API: submit jobs, read their status. Imports no torch."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import redis
from celery import Celery
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import polling
from .app import make_app
from .ratelimit import Limit, RateLimiter, parse_limits
from .schema import NAME, JobSpec, JobValidationError, parse_job
from .settings import QUEUE_BULK, QUEUE_REALTIME, TASK_NAME, Settings
from .states import TERMINAL, JobState
from .voices import Store, VoiceLibrary, VoiceNotFound

# EXPIRED is recorded in Celery as a FAILURE (so plain Celery clients see it end) whose
# reason is JobExpired; this API reports it under its own name.
# A client-chosen job_id is claimed here (SET NX) before its message is sent; kept as
# long as results are (result_expires), so a retried submit finds the first job.
CLAIM_PREFIX = "ttspool:jobid:"
_CLAIM_TTL = 7 * 86400


@dataclass(frozen=True)
class JobStatus:
    id: str
    status: JobState
    url: str | None = None
    duration_s: float | None = None
    sample_rate: int | None = None
    error: str | None = None
    # What the model was given: the text after the front-end read its numbers and symbols.
    spoken_text: str | None = None
    format: str | None = None  # the output format (tasks.schema.AUDIO_FORMATS)
    # Characters of the text the front-end had no reading for and left out (each once).
    dropped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class Client:
    """Submit jobs and read results; one per process is enough (it is thread-safe)."""

    def __init__(self, settings: Settings | None = None, app: Celery | None = None,
                 rate_limits: Mapping[str, Limit] | None = None, storage: Store | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.app = app or make_app(self.settings)
        # Retries for about as long as a publish does (task_publish_retry_policy), so a
        # submit rides out a Redis restart on the claim and rate-limit calls too.
        self.redis = redis.Redis.from_url(self.settings.broker_url, socket_timeout=10, socket_connect_timeout=5,
                                          retry=Retry(ExponentialBackoff(cap=3, base=0.5), 10))
        if rate_limits is None:
            rate_limits = parse_limits(self.settings.rate_limits)
        self.limiter = RateLimiter(rate_limits, self.redis)
        # Voice names are checked against the library's Redis index, and against the
        # store itself when one is handed in (tasks/voices.py).
        self.voices = VoiceLibrary(storage, self.redis)

    def submit(self, job: Mapping[str, Any] | JobSpec) -> str:
        """Validate and enqueue one job; returns its id. Raises JobValidationError."""
        return self.submit_many([job])[0]

    def submit_many(self, jobs: Iterable[Mapping[str, Any] | JobSpec]) -> list[str]:
        """Validate every job first, then enqueue them all: one bad job enqueues nothing.

        A job whose client-chosen job_id was submitted before is not enqueued again: its
        existing id is returned. Raises RateLimited (nothing enqueued) when a tenant's
        bucket is short.
        """
        specs = [parse_job(dict(j) if not isinstance(j, JobSpec) else j) for j in jobs]
        # The broker first, through our own client: when it is down, a redis.ConnectionError
        # that names it, not Celery's result-backend message from inside send_task.
        self.redis.ping()
        self.check_voices(specs)
        self.limiter.take(spec.tenant for spec in specs)
        claimed = self._claim([spec.job_id for spec in specs if spec.job_id is not None])
        ids = []
        with self.app.producer_or_acquire() as producer:
            for spec in specs:
                if spec.job_id is not None and spec.job_id not in claimed:
                    ids.append(spec.job_id)
                    continue
                job_id = spec.job_id or uuid.uuid4().hex
                kwargs = spec.model_copy(update={"enqueued_at": time.time()}).task_kwargs()
                try:
                    self.app.send_task(
                        TASK_NAME,
                        kwargs=kwargs,
                        task_id=job_id,
                        queue=QUEUE_REALTIME if spec.priority == "realtime" else QUEUE_BULK,
                        producer=producer,
                    )
                except BaseException:
                    # Unsent claims would make a retry return ids of jobs that never ran.
                    if claimed:
                        self.redis.delete(*(CLAIM_PREFIX + j for j in claimed))
                    raise
                # Sent: a second copy of this id later in the same call is a duplicate.
                claimed.discard(job_id)
                ids.append(job_id)
        return ids

    def check_voices(self, specs: Iterable[JobSpec]) -> None:
        """Every voice name the jobs use is in the library, or JobValidationError."""
        unknown = self.unknown_voices(specs)
        if unknown:
            raise JobValidationError(f"invalid job: voice: {unknown[min(unknown)]}")

    def unknown_voices(self, specs: Iterable[JobSpec]) -> dict[str, str]:
        """The voice names the jobs use that the library does not have, each with why."""
        unknown = {}
        for name in {s.voice_name for s in specs if s.voice_name is not None}:
            try:
                self.voices.require(name)
            except VoiceNotFound as err:
                unknown[name] = str(err)
        return unknown

    def _claim(self, job_ids: list[str]) -> set[str]:
        """Atomically claim each id (SET NX); returns the ids this call claimed first."""
        if not job_ids:
            return set()
        # A token per call: when a SET NX is retried after its reply was lost, the key
        # already holds our own token, which still counts as our claim.
        token = uuid.uuid4().hex
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.set(CLAIM_PREFIX + job_id, token, nx=True, ex=_CLAIM_TTL)
        won = {j for j, ok in zip(job_ids, pipe.execute()) if ok}
        lost = sorted(set(job_ids) - won)
        if lost:
            holders = self.redis.mget([CLAIM_PREFIX + j for j in lost])
            won.update(j for j, h in zip(lost, holders) if h == token.encode())
        return won

    def status(self, job_id: str) -> JobStatus:
        """Raises JobValidationError for a string that cannot be a job id."""
        if not isinstance(job_id, str) or not NAME.fullmatch(job_id):
            raise JobValidationError("a job id is 1-128 characters of letters, digits, '.', '_' or '-'")
        meta = self.app.backend.get_task_meta(job_id)
        state = meta.get("status", JobState.PENDING)
        result = meta.get("result")
        if state == JobState.SUCCESS and isinstance(result, dict):
            return JobStatus(
                id=job_id,
                status=JobState.SUCCESS,
                url=result.get("url"),
                duration_s=result.get("duration_s"),
                sample_rate=result.get("sample_rate"),
                spoken_text=result.get("spoken_text"),
                format=result.get("format", "wav"),
                dropped=result.get("dropped"),
            )
        if state == JobState.FAILURE:
            kind = result.get("exc_type") if isinstance(result, dict) else type(result).__name__
            expired = kind == "JobExpired"
            return JobStatus(id=job_id, status=JobState.EXPIRED if expired else JobState.FAILURE,
                             error=error_text(result))
        # RECEIVED is Celery's; ttspool's worker records STARTED.
        if state in (JobState.STARTED, "RECEIVED"):
            return JobStatus(id=job_id, status=JobState.STARTED)
        return JobStatus(id=job_id, status=JobState.PENDING)

    def wait(self, job_ids: list[str], timeout: float = 600.0, poll: float = 0.2) -> list[JobStatus]:
        """Poll until every job is SUCCESS, FAILURE or EXPIRED, or raise TimeoutError."""
        done: dict[str, JobStatus] = {}

        def step() -> list[JobStatus] | None:
            for jid in job_ids:
                if jid not in done and (st := self.status(jid)).done:
                    done[jid] = st
            return [done[j] for j in job_ids] if len(done) == len(set(job_ids)) else None

        return polling.poll(step, timeout=timeout, every=poll, timed_out=lambda: (
            f"{len(set(job_ids)) - len(done)} job(s) not finished after {timeout:.0f} s"))

    def close(self) -> None:
        self.redis.close()
        self.app.close()


def error_text(result: Any) -> str:
    if isinstance(result, dict):
        msg = result.get("exc_message")
        if isinstance(msg, (list, tuple)):
            msg = " ".join(str(m) for m in msg)
        kind = result.get("exc_type") or "Error"
        return f"{kind}: {msg}" if msg else str(kind)
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {result}"
    return str(result) if result is not None else "unknown error"
