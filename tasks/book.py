"""Books: long text as one job per segment, assembled into one file when all are done.

The "chord" is kept in Redis rather than in Celery's chord machinery: the worker records
each segment's end (`workers.pipeline.book_tracker.BookTracker.job_finished`), resubmits a failed segment a
bounded number of times, and the call that sees the last segment end sends one
`ttspool.assemble_book` task (guarded by SET NX, so several workers finishing segments
at once send it once). A Celery chord cannot do this: the GPU task records results per
request itself (celery-batches), and a chord counts a failed part as the end.

Keys (all expire after BOOK_TTL):
  ttspool:book:{id}         hash: spec (JSON), total, state, error, result (JSON)
  ttspool:book:{id}:jobs    hash: segment index -> current job id
  ttspool:book:{id}:done    hash: segment index -> seconds of audio
  ttspool:book:{id}:failed  hash: segment index -> error of its last attempt
  ttspool:book:{id}:final   set once, by whoever ends the book
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import redis

from tasks.text.lengths import STEPS_PER_SECOND
from tasks.text.segments import DEFAULT_MAX_SECONDS, split_text

from . import polling
from .claims import task_id
from .producer import Client
from .schema import BOOK_FORMAT_ALIASES, BOOK_FORMATS, JobSpec, JobValidationError, parse_job
from .states import JobState

BOOK_PREFIX = "ttspool:book:"
BOOK_TTL = 7 * 86400
MAX_ATTEMPTS = 3
MAX_PAUSE_MS = 10_000
_BOOK_ID = re.compile(r"book-[0-9a-f]{32}")
# Segment job ids name their book, segment and attempt, so the worker needs no lookup
# for the (usual) jobs that belong to no book.
SEGMENT_ID = re.compile(r"(book-[0-9a-f]{32})\.(\d+)\.(\d+)")
_JOB_FIELDS = ("voice", "seed", "speed", "temperature", "top_p", "top_k", "max_tokens", "tenant", "lang", "normalize")


def is_book_id(value: str) -> bool:
    return _BOOK_ID.fullmatch(value) is not None


def segment_job_id(book_id: str, index: int, attempt: int) -> str:
    return f"{book_id}.{index:05d}.{attempt}"


def book_key(book_id: str, part: str = "") -> str:
    return BOOK_PREFIX + book_id + (":" + part if part else "")


@dataclass(frozen=True)
class BookStatus:
    id: str
    status: JobState  # PENDING, STARTED, ASSEMBLING, SUCCESS or FAILURE
    segments: int
    done: int = 0
    failed: int = 0
    audio_s: float = 0.0
    url: str | None = None
    manifest_url: str | None = None
    srt_url: str | None = None
    duration_s: float | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in (JobState.SUCCESS, JobState.FAILURE)

    def to_dict(self) -> dict[str, Any]:
        """The final result, as `ttspool book --json` prints it."""
        return {"id": self.id, "status": self.status, "url": self.url, "manifest_url": self.manifest_url,
                "srt_url": self.srt_url, "duration_s": self.duration_s, "segments": self.segments,
                "error": self.error}

    def progress_dict(self) -> dict[str, Any]:
        return {**self.to_dict(), "done": self.done, "failed": self.failed, "audio_s": round(self.audio_s, 3)}


def submit_book(
    client: Client,
    text: str,
    *,
    voice: int | str = JobSpec.model_fields["voice"].default,
    seed: int = JobSpec.model_fields["seed"].default,
    speed: int = JobSpec.model_fields["speed"].default,
    pause_ms: int = 300,
    out_format: str = "wav",
    job: dict[str, Any] | None = None,
    max_segment_s: float = DEFAULT_MAX_SECONDS,
    segments: list[str] | None = None,
) -> str:
    """Split `text` into segments of at most `max_segment_s` predicted seconds (or take
    the given `segments`), enqueue one bulk job per segment, and return the book id.
    `job` adds per-segment job fields (temperature, max_tokens, tenant, ...). Raises
    JobValidationError (nothing enqueued) for bad input."""
    out_format = BOOK_FORMAT_ALIASES.get(out_format, out_format)
    if out_format not in BOOK_FORMATS:
        raise JobValidationError(f"out format must be one of {', '.join(BOOK_FORMATS)}, got {out_format!r}")
    if not 0 <= pause_ms <= MAX_PAUSE_MS:
        raise JobValidationError(f"pause must be 0-{MAX_PAUSE_MS} ms, got {pause_ms}")
    extra = dict(job or {})
    unknown = set(extra) - set(_JOB_FIELDS)
    if unknown:
        raise JobValidationError(f"book jobs cannot set {', '.join(sorted(unknown))}")
    common = {**extra, "voice": voice, "seed": seed, "speed": speed, "priority": "bulk"}
    if not 1.0 <= max_segment_s <= DEFAULT_MAX_SECONDS:
        raise JobValidationError(f"segment length must be 1-{DEFAULT_MAX_SECONDS:g} s, got {max_segment_s:g}")
    max_steps = round(max_segment_s * STEPS_PER_SECOND)
    texts = segments if segments is not None else [s.text for s in split_text(text, speed=speed, max_steps=max_steps)]
    if not texts:
        raise JobValidationError("book text is empty")
    book_id = "book-" + uuid.uuid4().hex
    jobs = []
    for i, seg in enumerate(texts):
        kwargs = {**common, "text": seg, "job_id": segment_job_id(book_id, i, 1)}
        try:
            parse_job(kwargs)
        except JobValidationError as err:
            raise JobValidationError(f"segment {i} ({seg[:40]!r}): {err}") from None
        jobs.append(kwargs)
    spec: dict[str, Any] = {"id": book_id, "pause_ms": pause_ms, "format": out_format, "job": common,
                            "segments": texts, "created_at": time.time()}
    first = parse_job(jobs[0])
    client.check_voices([first])
    name = first.voice_name
    if name is not None:
        # The version the book was submitted with; each segment's result says which
        # version it was made with (a replacement mid-book shows there).
        spec["voice"] = {"name": name, "version": client.voices.scoped(first.tenant).require(name).version}
    # The book exists before its first segment can finish, or that segment's end would
    # not be counted.
    pipe = client.redis.pipeline()
    pipe.hset(book_key(book_id), mapping={"spec": json.dumps(spec), "total": len(texts), "state": JobState.PENDING})
    # Task ids: a tenant's segments lie in its id space (tasks/claims.py).
    pipe.hset(book_key(book_id, "jobs"), mapping={str(i): task_id(first.tenant, j["job_id"])
                                                  for i, j in enumerate(jobs)})
    for part in ("", "jobs"):
        pipe.expire(book_key(book_id, part), BOOK_TTL)
    pipe.execute()
    try:
        client.submit_many(jobs)
    except BaseException:
        client.redis.delete(book_key(book_id), book_key(book_id, "jobs"))
        raise
    return book_id


def book_status(r: redis.Redis, book_id: str) -> BookStatus | None:
    """Progress or result of a book; None when no such book is recorded."""
    pipe = r.pipeline(transaction=True)
    pipe.hmget(book_key(book_id), ["total", "state", "error", "result"])
    pipe.hvals(book_key(book_id, "done"))
    pipe.hlen(book_key(book_id, "failed"))
    (total, state, error, result), done, failed = pipe.execute()
    if total is None:
        return None
    state = JobState(state.decode())
    audio_s = sum(float(d) for d in done)
    if state == JobState.PENDING and done:
        state = JobState.STARTED
    res = json.loads(result) if result else {}
    return BookStatus(
        id=book_id, status=state, segments=int(total), done=len(done), failed=failed, audio_s=audio_s,
        url=res.get("url"), manifest_url=res.get("manifest_url"), srt_url=res.get("srt_url"),
        duration_s=res.get("duration_s"), error=error.decode() if error else None,
    )


def wait_book(r: redis.Redis, book_id: str, timeout: float = 3600.0, poll: float = 0.5,
              on_progress: Callable[[BookStatus], None] | None = None) -> BookStatus:
    """Poll until the book is SUCCESS or FAILURE, or raise TimeoutError."""
    last: list[BookStatus] = []

    def step() -> BookStatus | None:
        st = book_status(r, book_id)
        if st is None:
            raise ValueError(f"no book {book_id!r} (unknown, or expired after {BOOK_TTL // 86400} days)")
        if on_progress is not None:
            on_progress(st)
        last[:] = [st]
        return st if st.finished else None

    return polling.poll(step, timeout=timeout, every=poll, timed_out=lambda: (
        f"book {book_id}: {last[0].done}/{last[0].segments} segments after {timeout:.0f} s"))


def load_spec(r: redis.Redis, book_id: str) -> tuple[dict[str, Any], dict[int, str]]:
    """The book's spec and the current job id of each segment."""
    raw = r.hget(book_key(book_id), "spec")
    if raw is None:
        raise KeyError(f"no book {book_id!r}")
    jobs = {int(k): v.decode() for k, v in r.hgetall(book_key(book_id, "jobs")).items()}
    return json.loads(raw), jobs
