"""Admission: whether a held message may become a job of this worker, and strikes.

Every new message is checked once: its claim on its id (a message that lost its id to a
different job is refused without touching that job's record), its kwargs (a bad one
fails alone), its result (a redelivery after its result was recorded is not run again)
and its strikes (GPU batches it was in that never returned: past the limit it is
dead-lettered instead of taking the worker down once more).
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Sequence

import redis
from celery import Celery

from tasks.claims import Claim, claim_key, digest_of, in_own_space, taken_error, task_id, tenant_of
from tasks.envelope import Rejection
from tasks.errors import RedeliveryLimit
from tasks.schema import JobValidationError, parse_job
from tasks.settings import DEAD_LETTER_KEY
from tasks.states import TERMINAL, JobState

from workers.pipeline.jobs import Outcome
from workers.pipeline.jobs import Job
from workers.pipeline.recorder import DELIVERIES, STRIKES, Recorder
from workers.pipeline.rejections import Rejections
from workers.pipeline.task_events import TaskEvents


class Admission:
    def __init__(self, app: Celery, r: redis.Redis, max_strikes: int, recorder: Recorder,
                 events: TaskEvents, rejections: Rejections, ttl_s: int) -> None:
        self.app = app
        self.rejections = rejections
        self.redis = r
        self.max_strikes = max_strikes
        self.recorder = recorder
        self.events = events
        # Of claims, delivery counts and strikes: at most as long as the result. A
        # redelivered message is recognized as done by its result while that lasts.
        self.ttl_s = ttl_s

    def admit(self, requests: Sequence[Any], out: Outcome) -> list[Job]:
        """The jobs among `requests` that may run; the others end here (in `out.finished`)."""
        jobs: list[Job] = []
        for req in self._owned(requests, out):
            self.events.received(req.id, req.kwargs)
            try:
                if req.args:
                    raise JobValidationError("ttspool.synthesize takes keyword arguments only")
                spec = parse_job(req.kwargs)
            except JobValidationError as err:
                self.recorder.fail(req.id, req.kwargs, err)
                out.finished.add(req.id)
                continue
            if spec.job_id is not None and req.id not in (spec.job_id, task_id(spec.tenant, spec.job_id)):
                # Recorded under one id, the other would stay PENDING forever.
                self.rejections.record(Rejection("id_mismatch", f"kwargs job_id {spec.job_id!r} differs from the "
                                                           f"message id {req.id!r}", req.id),
                                  json.dumps(req.kwargs, default=str), owner=True)
                out.finished.add(req.id)
                continue
            jobs.append(Job(req.id, spec, dict(req.kwargs)))
        if not jobs:
            return []
        pipe = self.redis.pipeline()
        for job in jobs:
            pipe.incr(DELIVERIES + job.id)
            pipe.expire(DELIVERIES + job.id, self.ttl_s)
            pipe.get(STRIKES + job.id)
            pipe.get(self.app.backend.get_key_for_task(job.id))
        replies = pipe.execute()
        admitted = []
        for job, raw_strikes, raw_result in zip(jobs, replies[2::4], replies[3::4]):
            strikes = int(raw_strikes or 0)
            if self._ended(raw_result):
                # Redelivered after its result was recorded (the worker died or Redis
                # restarted before the ack): report it once, do not run it again.
                out.finished.add(job.id)
            elif strikes >= self.max_strikes:
                # Counted in GPU batches that never returned, not in deliveries: jobs that
                # only shared a batch (or a buffer) with a crashing job are not blamed.
                reason = RedeliveryLimit(
                    f"job was in {strikes} GPU batches that never finished (the worker died "
                    f"or hung each time; limit {self.max_strikes}); moved to {DEAD_LETTER_KEY}"
                )
                self.redis.lpush(DEAD_LETTER_KEY, json.dumps({"id": job.id, "kwargs": job.kwargs,
                                                              "reason": str(reason), "at": time.time()}))
                self.recorder.fail(job.id, job.kwargs, reason)
                out.finished.add(job.id)
            else:
                job.suspect = strikes > 0
                self.app.backend.store_result(job.id, {"id": job.id}, JobState.STARTED)
                admitted.append(job)
        return admitted

    def strike(self, jobs: Iterable[Job], n: int) -> None:
        """+1 as a job's row joins a GPU batch, -1 as it leaves it: only a batch the worker
        dies (or hangs past the visibility timeout) in leaves one."""
        pipe = self.redis.pipeline()
        for job in jobs:
            pipe.incrby(STRIKES + job.id, n)
            pipe.expire(STRIKES + job.id, self.ttl_s)
        pipe.execute()

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
        self.rejections.record(Rejection("id_taken", taken_error(request.id), None), json.dumps(request.kwargs, default=str))

    def _owned(self, requests: Sequence[Any], out: Outcome) -> list[Any]:
        """Requests whose id is theirs: claimed here when unclaimed (a plain Celery client),
        refused when claimed by a different job, without touching that job's record."""
        if not requests:
            return []
        foreign = [req for req in requests if not in_own_space(req.id, req.kwargs)]
        for req in foreign:
            # Nothing of the tenant whose space the id names is touched, not even its claim.
            self.rejections.record(Rejection("id_scope", f"task id {req.id!r} is in another tenant's space than "
                                                         f"the job's tenant {tenant_of(req.kwargs)!r}", None),
                                   json.dumps(req.kwargs, default=str))
            out.finished.add(req.id)
        requests = [req for req in requests if in_own_space(req.id, req.kwargs)]
        if not requests:
            return []
        pipe = self.redis.pipeline(transaction=False)
        claims = [self._claim_of(req.kwargs) for req in requests]
        for req, claim in zip(requests, claims):
            pipe.set(claim_key(req.id), claim.encode(), nx=True, ex=self.ttl_s)
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

    def _ended(self, raw_result: bytes | None) -> bool:
        """Whether the job's result (as Redis holds it) says it ended."""
        if raw_result is None:
            return False
        try:
            meta = self.app.backend.decode_result(raw_result)
        except Exception:  # noqa: BLE001 - not a result Celery wrote: the job is not over
            return False
        return isinstance(meta, dict) and meta.get("status") in TERMINAL
