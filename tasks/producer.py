"""The producer API: submit jobs, read their status. Imports no torch."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

from celery import Celery

from .app import make_app
from .schema import JobSpec, parse_job
from .settings import QUEUE_BULK, QUEUE_REALTIME, TASK_NAME, Settings

TERMINAL = ("SUCCESS", "FAILURE")


@dataclass(frozen=True)
class JobStatus:
    id: str
    status: str
    url: str | None = None
    duration_s: float | None = None
    sample_rate: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class Client:
    """Submit jobs and read results; one per process is enough (it is thread-safe)."""

    def __init__(self, settings: Settings | None = None, app: Celery | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.app = app or make_app(self.settings)

    def submit(self, job: Mapping[str, Any] | JobSpec) -> str:
        """Validate and enqueue one job; returns its id. Raises JobValidationError."""
        return self.submit_many([job])[0]

    def submit_many(self, jobs: Iterable[Mapping[str, Any] | JobSpec]) -> list[str]:
        """Validate every job first, then enqueue them all: one bad job enqueues nothing."""
        specs = [parse_job(dict(j) if not isinstance(j, JobSpec) else j) for j in jobs]
        ids = []
        with self.app.producer_or_acquire() as producer:
            for spec in specs:
                job_id = spec.job_id or uuid.uuid4().hex
                kwargs = spec.model_copy(update={"enqueued_at": time.time()}).task_kwargs()
                self.app.send_task(
                    TASK_NAME,
                    kwargs=kwargs,
                    task_id=job_id,
                    queue=QUEUE_REALTIME if spec.priority == "realtime" else QUEUE_BULK,
                    producer=producer,
                )
                ids.append(job_id)
        return ids

    def status(self, job_id: str) -> JobStatus:
        meta = self.app.backend.get_task_meta(job_id)
        state = meta.get("status", "PENDING")
        result = meta.get("result")
        if state == "SUCCESS" and isinstance(result, dict):
            return JobStatus(
                id=job_id,
                status=state,
                url=result.get("url"),
                duration_s=result.get("duration_s"),
                sample_rate=result.get("sample_rate"),
            )
        if state == "FAILURE":
            return JobStatus(id=job_id, status=state, error=_error_text(result))
        if state in ("STARTED", "RECEIVED"):
            return JobStatus(id=job_id, status="STARTED")
        return JobStatus(id=job_id, status="PENDING")

    def wait(self, job_ids: list[str], timeout: float = 600.0, poll: float = 0.2) -> list[JobStatus]:
        """Poll until every job is SUCCESS or FAILURE, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        pending = list(job_ids)
        done: dict[str, JobStatus] = {}
        while pending:
            for jid in list(pending):
                st = self.status(jid)
                if st.done:
                    done[jid] = st
                    pending.remove(jid)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} job(s) not finished after {timeout:.0f} s")
            time.sleep(poll)
        return [done[j] for j in job_ids]

    def close(self) -> None:
        self.app.close()


def _error_text(result: Any) -> str:
    if isinstance(result, dict):
        msg = result.get("exc_message")
        if isinstance(msg, (list, tuple)):
            msg = " ".join(str(m) for m in msg)
        kind = result.get("exc_type") or "Error"
        return f"{kind}: {msg}" if msg else str(kind)
    return str(result) if result is not None else "unknown error"
