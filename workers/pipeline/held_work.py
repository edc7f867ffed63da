"""The table of held work: every job the worker holds, prepared once (spoken text, voice,
content key), merged with the other held jobs that would make the same audio, served
from storage when that audio exists already, and expired when its deadline passes."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Collection, Iterable, Sequence

from storage.content_keys import content_key, object_key
from storage import Storage, StorageError
from tasks.audio import FORMATS, duration_of
from tasks.errors import JobExpired, JobFailed
from tasks.text.frontend import FrontEnd
from tasks.text.lengths import predicted_steps

from workers.pipeline.jobs import Outcome
from workers.engine.requests import SynthRequest
from workers.pipeline.jobs import Job, Phase, Work
from workers.metrics import Metrics
from workers.pipeline.recorder import DURATION_META, RATE_META, Recorder
from workers.pipeline.voice_resolver import VoiceResolver

if TYPE_CHECKING:
    from workers.engine.engine import Engine

log = logging.getLogger(__name__)


class HeldWork:
    def __init__(self, engine: Engine, storage: Storage, frontend: FrontEnd,
                 voices: VoiceResolver, recorder: Recorder, metrics: Metrics) -> None:
        self.engine = engine
        self.storage = storage
        self.frontend = frontend
        self.voices = voices
        self.recorder = recorder
        self.metrics = metrics
        self.jobs: dict[str, Job] = {}
        # Work in the GPU batch, by content key: a job arriving meanwhile with the same
        # key joins it instead of being synthesized a second time.
        self.running: dict[str, Work] = {}
        # Storage lookups of the jobs that arrived in one tick run side by side: one at a
        # time, a tick that took 16 jobs waited 16 storage round trips.
        self._lookups = ThreadPoolExecutor(max_workers=8, thread_name_prefix="cache-lookup")
        self._looking: dict[str, Future[dict[str, Any] | None]] = {}  # by content key

    def close(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)

    def sync(self, requests: Sequence[Any]) -> list[Any]:
        """Forget jobs no longer held; return the requests not admitted yet. A job stays
        admitted while the same message is held: another message now held under its id
        (one that won the id's claim) is admitted afresh."""
        held = {r.id: r for r in requests}
        self.jobs = {k: v for k, v in self.jobs.items() if k in held and v.kwargs == held[k].kwargs}
        return [r for r in requests if r.id not in self.jobs]

    def add(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self.jobs[job.id] = job

    def forget(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self.jobs.pop(job_id, None)
        if self._looking:
            # A lookup whose jobs all ended (or went back) meanwhile has nobody to serve.
            keys = {job.key for job in self.jobs.values()}
            self._looking = {k: f for k, f in self._looking.items() if k in keys}

    def recheck(self) -> None:
        """After a failed tick: every held message goes back (workers.broker.gpu_batches), and a
        batch may have stored some of its audio before: look in storage again when they
        return, rather than synthesize it a second time."""
        self.running.clear()
        self._looking.clear()
        for job in self.jobs.values():
            if job.phase in (Phase.RUNNING, Phase.STORING):
                job.move(Phase.READY)
            job.cache_checked = False

    def ready(self, out: Outcome, wait: bool = True, busy: Collection[str] = ()) -> list[Work]:
        """Work waiting for the GPU: every held job prepared (once) and merged by content
        key, less what storage already has (served here). A running batch asks without
        `wait`: work still being looked up in storage is left out until its lookup is
        back (the GPU does not wait for storage), jobs whose voice could not be read are
        tried again at the next tick only, and keys in `busy` are left for later."""
        works: dict[str, Work] = {}
        for job in list(self.jobs.values()):
            if job.phase is Phase.ADMITTED:
                if job.voice_wait and not wait:
                    continue
                if not self._prepare(job, out):
                    continue
            if job.phase is not Phase.READY or job.key in busy:
                continue
            assert job.key is not None and job.request is not None
            works.setdefault(job.key, Work(job.key, job.request)).jobs.append(job)
        return self._serve_cached(list(works.values()), out, wait)

    def realtime_lookup_pending(self) -> bool:
        """Whether a realtime job waits for its storage lookup (a running batch keeps its
        free rows for it rather than give them to bulk work looked up sooner)."""
        return any(job.key in self._looking and job.spec.priority == "realtime" and job.phase is Phase.READY
                   for job in self.jobs.values())

    def expire(self, work: Work, now: float, out: Outcome) -> None:
        """Past its deadline: nobody waits for it any more, so it ends without the GPU."""
        for job in work.jobs:
            self.recorder.fail(job.id, job.kwargs, JobExpired(f"deadline passed before the job could run "
                                                              f"(held {now - job.arrived:.1f} s)"))
            job.move(Phase.FINISHED)
            out.finished.add(job.id)

    # -- preparation --------------------------------------------------------------

    def _prepare(self, job: Job, out: Outcome) -> bool:
        """Spoken text, voice, content key and predicted length; False if the job ended
        here (failed) or waits (its library voice is unreadable just now)."""
        s = job.spec
        try:
            text = self.engine.normalize(self._spoken(job))
            if not text.strip():
                raise JobFailed("text is empty after normalization (no speakable characters)", reason="empty_text")
            voice = self.voices.resolve(s.voice, s.voice_name, s.tenant)
        except JobFailed as err:
            self.recorder.fail(job.id, job.kwargs, err)
            job.move(Phase.FINISHED)
            out.finished.add(job.id)
            return False
        except StorageError as err:
            # Looked at again next tick, like an upload that waits for storage.
            if not job.voice_wait:
                log.warning("job %s waits for its voice %r: %s", job.id, s.voice_name, err)
            job.voice_wait = True
            return False
        job.spoken_text = text
        job.voice = voice.label
        job.key = object_key(content_key(self.engine.model_id, text, {**s.sampling_params(), "voice": voice.key}),
                             FORMATS[s.format].extension)
        job.request = SynthRequest(text=text, voice=voice.voice, seed=s.seed, speed=s.speed,
                                   temperature=float(s.temperature), top_p=float(s.top_p),
                                   top_k=s.top_k, max_tokens=s.max_tokens)
        # Predicted once: the scheduler asks for it on every tick.
        job.steps = predicted_steps(text, s.speed, s.max_tokens)
        job.move(Phase.READY)
        return True

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

    # -- cache --------------------------------------------------------------------

    def _serve_cached(self, works: list[Work], out: Outcome, wait: bool) -> list[Work]:
        """Serve from storage every work whose exact output exists already (no GPU); the
        rest, to synthesize. Each job is looked up once, not on every scheduler tick: a
        HEAD on its content key, for all of them side by side."""
        new = [w for w in works if not all(j.cache_checked for j in w.jobs)]
        for work in new:
            for job in work.jobs:
                job.cache_checked = True
        new = [w for w in new if w.key not in self._looking]  # a job joining a lookup under way
        for work in new:
            self._looking[work.key] = self._lookups.submit(self._stored_record, work)
        rest, found = [], []
        for work in works:
            looking = self._looking.get(work.key)
            if looking is None:
                rest.append(work)
                continue
            if not wait and not looking.done():
                continue
            del self._looking[work.key]
            record = looking.result()
            if record is None:
                rest.append(work)
            else:
                found.append((work, record))
        # Each job's durable record, side by side (one storage round trip in all).
        keeping = {job.id: self._lookups.submit(self.recorder.keep, job, record, True)
                   for work, record in found for job in work.jobs}
        for work, record in found:
            try:
                results = [keeping[job.id].result() for job in work.jobs]
            except StorageError as err:
                # Synthesized instead: the store stage retries (and requeues) as for any row.
                log.warning("could not write the durable record of a job served from storage: %s", err)
                rest.append(work)
                continue
            for job, result in zip(work.jobs, results):
                self.recorder.succeed(job, result)
                job.move(Phase.FINISHED)
                out.finished.add(job.id)
        return rest

    def _stored_record(self, work: Work) -> dict[str, Any] | None:
        try:
            meta = self.storage.head(work.key)
            if meta is None:
                return None
            fmt = work.jobs[0].spec.format
            if DURATION_META in meta:
                duration, sr = float(meta[DURATION_META]), int(meta[RATE_META])
            else:
                # Stored by an older worker, or in a store without metadata (a folder):
                # the object itself says its length, rather than a second synthesis.
                duration, sr = duration_of(self.storage.get_bytes(work.key), fmt, self.engine.sample_rate)
            return {"url": self.storage.url_for(work.key), "key": work.key,
                    "duration_s": round(duration, 6), "sample_rate": sr, "format": fmt}
        except Exception as err:  # noqa: BLE001 - a bad record or object costs a synthesis, not the tick
            # StorageError (an outage), and also bad metadata or a stored object
            # that does not decode: raised out of the tick, either would requeue every
            # held job, and the same lookup would fail again on redelivery, forever.
            log.warning("cache lookup of %s failed, synthesizing instead: %s", work.key, err)
            return None
