"""Books on the worker: counting segment ends (`BookTracker`, called as each job's result
is recorded) and `ttspool.assemble_book`: a book's segment audio, in order and with
pauses, as one file, plus a manifest (JSON) and subtitles (SRT) next to it in storage.

A plain Celery task on its own queue. It shares the worker's single pool thread with
the GPU batches, so it is kept short: segment downloads run in parallel, and the work
is decode + concatenate + encode (about a second per hour of audio on one CPU core).
"""

from __future__ import annotations

import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import redis
import soundfile as sf
from celery import Celery, Task

from storage import Storage, StorageError
from tasks import job_records
from tasks.book import BOOK_TTL, MAX_ATTEMPTS, SEGMENT_ID, book_key, load_spec, segment_job_id
from tasks.claims import split_task_id, task_id
from tasks.settings import ASSEMBLE_TASK, QUEUE_ASSEMBLE, QUEUE_BULK, TASK_NAME
from tasks.states import JobState

log = logging.getLogger(__name__)

_SOUNDFILE = {"wav": ("WAV", "PCM_16", "audio/wav"), "flac": ("FLAC", "PCM_16", "audio/flac"),
              "opus": ("OGG", "OPUS", "audio/ogg"),
              # Books submitted before "ogg" became a name of "opus" (tasks/book.py), as they asked.
              "ogg": ("OGG", "VORBIS", "audio/ogg")}
_MAX_TRIES = 4
_BLOCK = 1 << 18


def finish_book(r: redis.Redis, book_id: str, state: JobState, *, error: str | None = None,
                result: dict[str, Any] | None = None) -> None:
    mapping: dict[str, str] = {"state": state}
    if error is not None:
        mapping["error"] = error
    if result is not None:
        mapping["result"] = json.dumps(result)
    pipe = r.pipeline()
    pipe.hset(book_key(book_id), mapping=mapping)
    pipe.ttl(book_key(book_id))
    _, ttl = pipe.execute()
    # A book whose keys expired (or were deleted) gets its hash back here: bounded by the
    # same expiry as every other book key, not kept forever.
    if ttl < 0:
        r.expire(book_key(book_id), BOOK_TTL)


class BookTracker:
    """Worker side: counts segment ends, retries failed segments, starts assembly."""

    def __init__(self, app: Celery, r: redis.Redis, max_attempts: int = MAX_ATTEMPTS) -> None:
        self.app = app
        self.redis = r
        self.max_attempts = max_attempts

    def job_finished(self, job_id: str, duration_s: float | None = None, error: str | None = None) -> None:
        """Called once a job's result is recorded; ignores jobs that belong to no book."""
        m = SEGMENT_ID.fullmatch(split_task_id(job_id)[1])
        if m is None:
            return
        book_id, index, attempt = m[1], int(m[2]), int(m[3])
        try:
            self._segment_finished(book_id, index, attempt, job_id, duration_s, error)
        except redis.RedisError as err:
            # The job's own result is recorded; only the book's bookkeeping is behind.
            log.warning("book %s: could not record segment %d: %s", book_id, index, err)

    def _segment_finished(self, book_id: str, index: int, attempt: int, job_id: str,
                          duration_s: float | None, error: str | None) -> None:
        current = self.redis.hget(book_key(book_id, "jobs"), str(index))
        if current is None or current.decode() != job_id:
            return  # not a book any more, or an attempt that was already replaced
        if error is None:
            pipe = self.redis.pipeline()
            pipe.hset(book_key(book_id, "done"), str(index), repr(float(duration_s or 0.0)))
            pipe.hdel(book_key(book_id, "failed"), str(index))
            pipe.expire(book_key(book_id, "done"), BOOK_TTL)
            pipe.execute()
        elif attempt < self.max_attempts:
            self._retry(book_id, index, attempt + 1, error)
            return
        else:
            self.redis.hset(book_key(book_id, "failed"), str(index), error)
            self.redis.expire(book_key(book_id, "failed"), BOOK_TTL)
        self._maybe_end(book_id)

    def _retry(self, book_id: str, index: int, attempt: int, error: str) -> None:
        spec, _ = load_spec(self.redis, book_id)
        new_id = segment_job_id(book_id, index, attempt)
        task = task_id(spec["job"].get("tenant"), new_id)
        log.info("book %s: segment %d failed (%s); attempt %d as %s", book_id, index, error, attempt, task)
        kwargs = {**spec["job"], "text": spec["segments"][index], "job_id": new_id, "enqueued_at": time.time()}
        self.redis.hset(book_key(book_id, "jobs"), str(index), task)
        self.app.send_task(TASK_NAME, kwargs=kwargs, task_id=task, queue=QUEUE_BULK)

    def _maybe_end(self, book_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hget(book_key(book_id), "total")
        pipe.hlen(book_key(book_id, "done"))
        pipe.hgetall(book_key(book_id, "failed"))
        total, done, failed = pipe.execute()
        if total is None or done + len(failed) < int(total):
            return
        if not self.redis.set(book_key(book_id, "final"), "1", nx=True, ex=BOOK_TTL):
            return
        if failed:
            indexes = sorted(int(k) for k in failed)
            first = failed[str(indexes[0]).encode()].decode()
            finish_book(self.redis, book_id, JobState.FAILURE, error=(
                f"segment(s) {', '.join(map(str, indexes))} failed after {self.max_attempts} attempts "
                f"(segment {indexes[0]}: {first}); the book was not assembled"))
            return
        finish_book(self.redis, book_id, JobState.ASSEMBLING)
        self.app.send_task(ASSEMBLE_TASK, kwargs={"book_id": book_id}, task_id=f"{book_id}.assemble",
                           queue=QUEUE_ASSEMBLE)


def srt_time(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def srt_text(segments: list[dict[str, Any]]) -> str:
    return "\n".join(f"{s['index'] + 1}\n{srt_time(s['start_s'])} --> {srt_time(s['end_s'])}\n{s['text']}\n"
                     for s in segments)


def _write(out: sf.SoundFile, audio: np.ndarray) -> None:
    # libsndfile's Vorbis encoder crashes the process (SIGSEGV) on very large single
    # writes (seen with one hour at once), so audio goes in in blocks.
    for i in range(0, len(audio), _BLOCK):
        out.write(audio[i:i + _BLOCK])


def assemble(app: Celery, r: redis.Redis, storage: Storage, book_id: str) -> dict[str, Any]:
    spec, jobs = load_spec(r, book_id)
    texts: list[str] = spec["segments"]
    records = []
    for i in range(len(texts)):
        meta = app.backend.get_task_meta(jobs[i])
        if meta.get("status") != JobState.SUCCESS or not isinstance(meta.get("result"), dict):
            raise RuntimeError(f"segment {i} ({jobs[i]}) has no stored audio")
        records.append(meta["result"])
    with ThreadPoolExecutor(max_workers=8) as pool:
        blobs = list(pool.map(lambda rec: storage.get_bytes(job_records.audio_key(storage.base_url, rec["url"])),
                              records))
    parts = []
    rate = 0
    for i, blob in enumerate(blobs):
        audio, sr = sf.read(io.BytesIO(blob), dtype="int16")
        if rate and sr != rate:
            raise RuntimeError(f"segment {i} is at {sr} Hz, the others at {rate} Hz")
        rate = sr
        parts.append(audio)
    pause = np.zeros(round(spec["pause_ms"] * rate / 1000), dtype=np.int16)
    fmt, subtype, content_type = _SOUNDFILE[spec["format"]]
    buf = io.BytesIO()
    segments, cursor = [], 0
    with sf.SoundFile(buf, "w", rate, 1, format=fmt, subtype=subtype) as out:
        for i, audio in enumerate(parts):
            if i:
                _write(out, pause)
                cursor += len(pause)
            segments.append({"index": i, "text": texts[i], "start_s": round(cursor / rate, 6),
                             "end_s": round((cursor + len(audio)) / rate, 6), "job_id": jobs[i],
                             "url": records[i].get("url"), "spoken_text": records[i].get("spoken_text"),
                             **({"voice_version": records[i]["voice"]["version"]} if "voice" in records[i] else {})})
            _write(out, audio)
            cursor += len(audio)
    base = f"books/{book_id}/{book_id}"
    duration_s = round(cursor / rate, 6)
    url = storage.put_bytes(f"{base}.{spec['format']}", buf.getvalue(), content_type)
    manifest = {"id": book_id, "url": url, "format": spec["format"], "sample_rate": rate,
                "duration_s": duration_s, "pause_ms": spec["pause_ms"], "job": spec["job"], "segments": segments,
                **({"voice": {**spec["voice"], "versions_used": sorted({s["voice_version"] for s in segments if "voice_version" in s})}}
                   if "voice" in spec else {})}
    manifest_url = storage.put_bytes(f"{base}.manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1).encode(),
                                     "application/json")
    srt_url = storage.put_bytes(f"{base}.srt", srt_text(segments).encode(), "application/x-subrip")
    return {"url": url, "key": f"{base}.{spec['format']}", "manifest_url": manifest_url, "srt_url": srt_url,
            "duration_s": duration_s, "segments": len(texts)}


def register(app: Celery, storage: Storage, r: redis.Redis) -> None:
    @app.task(name=ASSEMBLE_TASK, bind=True, acks_late=True, max_retries=_MAX_TRIES - 1)
    def assemble_book(self: Task, book_id: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            result = assemble(app, r, storage, book_id)
        except StorageError as err:
            if self.request.retries + 1 < _MAX_TRIES:
                raise self.retry(countdown=5 * (self.request.retries + 1)) from err
            finish_book(r, book_id, JobState.FAILURE, error=f"assembly failed after {_MAX_TRIES} tries: {err}")
            raise
        except (RuntimeError, KeyError, ValueError, sf.LibsndfileError) as err:
            finish_book(r, book_id, JobState.FAILURE, error=f"assembly failed: {err}")
            raise
        finish_book(r, book_id, JobState.SUCCESS, result=result)
        log.info("book %s assembled: %d segments, %.1f s of audio, in %.2f s", book_id, result["segments"],
                 result["duration_s"], time.perf_counter() - t0)
        return result
