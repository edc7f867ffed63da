"""The producer API: submit jobs, read their status. Imports no torch."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import redis
from celery import Celery

from . import job_records, polling
from .celery_app import make_app
from .broker_redis import broker_redis
from kombu.exceptions import OperationalError

from .claimed_publish import CLAIM_HEADER, ClaimLost, give_back, take_over
from .claims import Claim, claim_key, digest_of, is_task_id, taken_error, task_id
from .errors import BrokerFull, SubmitStopped
from .ratelimit import Limit, RateLimiter, parse_limits
from .schema import JobSpec, JobValidationError, parse_job
from .settings import QUEUE_BULK, QUEUE_REALTIME, TASK_NAME, Settings
from .states import TERMINAL, JobState
from .voices import Store, VoiceLibrary, VoiceNotFound

# EXPIRED is recorded in Celery as a FAILURE (so plain Celery clients see it end) whose
# reason is JobExpired; this API reports it under its own name.


@dataclass(frozen=True)
class Submitted:
    ids: list[str]  # one per job, in order
    new: list[str]  # the ids this call enqueued; the others existed already

    @property
    def existing(self) -> int:
        return len(set(self.ids)) - len(self.new)


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
    # The library voice it was made with (Voice.label: name, version, space); None for a seed
    # or a speaker string.
    voice: dict[str, Any] | None = None

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
        # A submit rides out a Redis restart on the claim and rate-limit calls too.
        self.redis = broker_redis(self.settings)
        if rate_limits is None:
            rate_limits = parse_limits(self.settings.rate_limits)
        self.limiter = RateLimiter(rate_limits, self.redis)
        # Voice names are checked against the library's Redis index, and against the
        # store itself when one is handed in (tasks/voices.py). The store also holds the
        # durable records of jobs Redis no longer keeps (tasks/job_records.py).
        self.storage = storage
        self.voices = VoiceLibrary(storage, self.redis)

    def submit(self, job: Mapping[str, Any] | JobSpec) -> str:
        """Validate and enqueue one job; returns its id. Raises JobValidationError."""
        return self.submit_many([job])[0]

    def submit_many(self, jobs: Iterable[Mapping[str, Any] | JobSpec]) -> list[str]:
        """Validate every job first, then enqueue them all: one bad job enqueues nothing.

        A job submitted before under the same job_id (the same job: same fields, same
        tenant) is not enqueued again: its existing id is returned. An id taken by a
        different job raises JobValidationError. Raises RateLimited (nothing enqueued) when
        a tenant's bucket is short, and BrokerFull when the broker refuses writes.
        """
        return self.submit_many_report(jobs).ids

    def submit_many_report(self, jobs: Iterable[Mapping[str, Any] | JobSpec]) -> Submitted:
        """submit_many, saying which ids were new and which existed already.

        A tenant's job ids are its own (tasks/claims.py): the ids returned for jobs with a
        tenant are task ids, "<tenant>:<job_id>", which `status` and `wait` take."""
        specs = [parse_job(dict(j) if not isinstance(j, JobSpec) else j) for j in jobs]
        # The broker first, through our own client: when it is down, a redis.ConnectionError
        # that names it, not Celery's result-backend message from inside send_task.
        self.redis.ping()
        self.check_voices(specs)
        ids = [task_id(spec.tenant, spec.job_id or uuid.uuid4().hex) for spec in specs]
        token = uuid.uuid4().hex
        wanted = {job_id: Claim(digest_of(spec.task_kwargs()), spec.tenant, token, sent=False)
                  for job_id, spec in zip(ids, specs)}
        for job_id, spec in zip(ids, specs):
            if not wanted[job_id].same_job(Claim(digest_of(spec.task_kwargs()), spec.tenant, token)):
                raise JobValidationError(f"invalid job: job_id: {taken_error(job_id)}")
        new: list[str] = []
        try:
            self.limiter.take(spec.tenant for spec in specs)
            won = self._claim(wanted)
            with self.app.producer_or_acquire() as producer:
                for job_id, spec in zip(ids, specs):
                    if job_id not in won:
                        continue  # submitted before, or earlier in this call
                    won.discard(job_id)
                    kwargs = spec.model_copy(update={"enqueued_at": time.time()}).task_kwargs()
                    try:
                        self.app.send_task(TASK_NAME, kwargs=kwargs, task_id=job_id,
                                           queue=QUEUE_REALTIME if spec.priority == "realtime" else QUEUE_BULK,
                                           producer=producer, headers={CLAIM_HEADER: token})
                    except ClaimLost:
                        continue  # a retry of this same job took the claim over and sends it
                    except BaseException:
                        # Unsent claims would make a retry return ids of jobs that never ran;
                        # a claim this send did push (its reply lost) is sent, and stays.
                        self._give_back(won | {job_id}, token)
                        raise
                    new.append(job_id)
        except (redis.exceptions.OutOfMemoryError, OperationalError) as err:
            if not _refused_for_memory(err):
                if new:
                    raise SubmitStopped(_stopped(len(new), len(set(ids)), f"the broker failed: {err}"), new) from err
                raise
            raise BrokerFull(_stopped(len(new), len(set(ids)), f"the broker's Redis is full (maxmemory) and "
                                      f"refuses new jobs ({err})"), new) from None
        except redis.RedisError as err:
            if new:
                raise SubmitStopped(_stopped(len(new), len(set(ids)), f"the broker failed: {err}"), new) from err
            raise
        return Submitted(ids, new)

    def check_voices(self, specs: Iterable[JobSpec]) -> None:
        """Every voice name the jobs use is in the library, or JobValidationError."""
        unknown = self.unknown_voices(specs)
        if unknown:
            # From the VoiceNotFound: its fix is what the CLI and the gateway phrase.
            err = unknown[min(unknown)]
            raise JobValidationError(f"invalid job: voice: {err}") from err

    def unknown_voices(self, specs: Iterable[JobSpec]) -> dict[str, VoiceNotFound]:
        """The voice names the jobs use that the library does not have, each with why. A
        name is looked up as the job's tenant sees the library (tasks/voices.py)."""
        unknown = {}
        for tenant, name in {(s.tenant, s.voice_name) for s in specs if s.voice_name is not None}:
            try:
                self.voices.scoped(tenant).require(name)
            except VoiceNotFound as err:
                unknown[name] = err
        return unknown

    def _claim(self, wanted: Mapping[str, Claim]) -> set[str]:
        """Claim each id (SET NX); returns the ids this call must send: those it claimed
        first, and those whose claim a producer that died before sending left unsent. An
        id held by a different job raises JobValidationError, and this call's claims are
        given back."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, claim in wanted.items():
            pipe.set(claim_key(job_id), claim.encode(), nx=True, ex=self.settings.result_ttl)
        won = {j for j, ok in zip(wanted, pipe.execute()) if ok}
        lost = sorted(set(wanted) - won)
        holders = self.redis.mget([claim_key(j) for j in lost]) if lost else []
        for job_id, raw in zip(lost, holders):
            if raw is None:
                continue  # expired in between: an old job, nothing to return but the id
            held = Claim.decode(raw)
            mine = wanted[job_id]
            if held.token == mine.token:
                won.add(job_id)  # a SET NX retried after its reply was lost: ours
            elif not held.same_job(mine):
                self._give_back(won, mine.token)
                raise JobValidationError(f"invalid job: job_id: {taken_error(job_id)}")
            elif not held.sent and take_over(self.redis, job_id, raw, mine.encode()):
                won.add(job_id)
        return won

    def _give_back(self, job_ids: set[str], token: str) -> None:
        """Delete this call's claims that are still unsent: not one a retry took over."""
        for job_id in job_ids:
            give_back(self.redis, job_id, token)

    def owner(self, job_id: str) -> Claim | None:
        """The claim on a job id (its tenant), or None for an id nobody submitted."""
        raw = self.redis.get(claim_key(job_id))
        return Claim.decode(raw) if raw is not None else None

    def status(self, job_id: str) -> JobStatus:
        """The job's status; PENDING for an id nobody submitted as well (`lookup` tells
        the two apart). Raises JobValidationError for a string that cannot be a job id."""
        return self.lookup(job_id) or JobStatus(id=job_id, status=JobState.PENDING)

    def lookup(self, job_id: str) -> JobStatus | None:
        """The job's status, or None for an id with no trace: no claim (a ttspool producer
        claims every id it sends), no result, no durable record. A job a plain Celery
        client sent has no claim, so it reads None until a worker starts it."""
        if not is_task_id(job_id):
            raise JobValidationError("a job id is 1-128 characters of letters, digits, '.', '_' or '-', "
                                     "after its tenant and ':' for a tenant's job")
        # The claim first, through our own client: a Redis this process never reached
        # fails here at once, not after the result backend's retries.
        claim = self.owner(job_id)
        meta = self.app.backend.get_task_meta(job_id)
        state = meta.get("status", JobState.PENDING)
        result = meta.get("result")
        if state == JobState.PENDING and claim is None:
            record = self._durable_record(job_id)
            return _status_of_record(record) if record is not None else None
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
                voice=result.get("voice"),
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

    def record(self, job_id: str) -> dict[str, Any] | None:
        """A finished job's result (its URL, spoken text, ...): Redis' while it keeps it,
        then the durable record's; None while it runs, or for an unknown id."""
        meta = self.app.backend.get_task_meta(job_id)
        if meta.get("status") in TERMINAL and isinstance(meta.get("result"), dict):
            result: dict[str, Any] = meta["result"]
            return result
        if meta.get("status", JobState.PENDING) != JobState.PENDING or self.owner(job_id) is not None:
            return None
        return self._durable_record(job_id)

    def _durable_record(self, job_id: str) -> dict[str, Any] | None:
        """Read only for an id nobody holds a claim on any more: a queued job's status is
        PENDING from Redis alone, without a storage round trip on every poll."""
        return None if self.storage is None else job_records.read(self.storage, job_id)

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


def _refused_for_memory(err: BaseException) -> bool:
    """Whether Redis refused a write for its maxmemory: redis-py's OutOfMemoryError, as
    is or as kombu wraps it when a publish meets it."""
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _stopped(sent: int, total: int, why: str) -> str:
    if not sent:
        return f"{why}: no job of this call was enqueued"
    return (f"{why}: {sent} of the {total} jobs were enqueued before it stopped (their ids are in this error's "
            "`enqueued`); submit the same jobs again to enqueue the rest, and only the rest")


def _status_of_record(record: Mapping[str, Any]) -> JobStatus:
    state = JobState(record["status"])
    if state == JobState.SUCCESS:
        return JobStatus(id=record["id"], status=state, url=record.get("url"), duration_s=record.get("duration_s"),
                         sample_rate=record.get("sample_rate"), spoken_text=record.get("spoken_text"),
                         format=record.get("format", "wav"), dropped=record.get("dropped"),
                         voice=record.get("voice"))
    return JobStatus(id=record["id"], status=state, error=record.get("error"))


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
