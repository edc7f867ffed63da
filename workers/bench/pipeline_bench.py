"""`ttspool bench --pipeline`: the engine alone against the whole path (producer, Redis,
a worker process, S3 uploads, recorded results) on the same jobs.

This module measures; tasks/cli/bench_pipeline.py starts the parts (Redis, an S3
endpoint behind a delay proxy, the worker) and hands in what it needs to steer them.

- Throughput: the engine bench's job set at the largest batch size, first through the
  engine in this process, then submitted at once (bulk) to the worker, once per storage
  delay: wall time from the first submit to the last recorded result.
- Latency: long bulk jobs keep the worker busy; short realtime jobs are submitted as the
  first bulk result is recorded, i.e. while a full batch of long bulk rows runs. With
  refill they join it and step ahead of its bulk rows (the engine's express lane);
  without, they wait for it to end. Their latency is set against the engine's time for
  the same realtime jobs alone.

Every number comes from what the worker recorded (status SUCCESS, duration_s); a job
that ends otherwise, or is served from storage instead of synthesized, fails the bench.
Completion times are seen on the result backend's pub/sub (tasks/gateway/results.py),
as the gateway sees them, not by polling.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol, Sequence

from tasks.producer import Client, error_text
from tasks.result_waiter import ResultWaiter
from tasks.settings import Settings
from tasks.states import JobState

from .engine_bench import make_jobs

# Latency workload: bulk texts long enough to keep a batch busy for a while, realtime
# texts short (a prompt, a confirmation). Characters, as make_jobs takes them.
BULK_CHARS = (120, 200)
REALTIME_CHARS = (10, 30)


@dataclass(frozen=True)
class JobSets:
    throughput: list[Any]  # SynthRequest, texts as written (the worker normalizes its own)
    bulk: list[Any]
    realtime: list[Any]


def job_sets(jobs: int, bulk: int, realtime: int) -> JobSets:
    return JobSets(make_jobs(jobs), make_jobs(bulk, seed=1, min_chars=BULK_CHARS[0], max_chars=BULK_CHARS[1]),
                   make_jobs(realtime, seed=2, min_chars=REALTIME_CHARS[0], max_chars=REALTIME_CHARS[1]))


def as_job(req: Any, priority: str) -> dict[str, Any]:
    """A SynthRequest as a producer job: the same text, voice, seed and sampling (the
    priority, not the engine's lane, is the producer's to say)."""
    return {**{k: v for k, v in asdict(req).items() if k != "express"}, "priority": priority}


def engine_side(load: Callable[[], Any], sets: JobSets, batch_size: int,
                refill: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The engine alone, in this process: the throughput set at `batch_size` (after one
    untimed batch, as `ttspool bench` does), and the realtime jobs, with ended rows
    refilled from the backlog when the worker does that too (`refill`), or one batch at a
    time. The engine is let go before this returns, so the worker started next has the
    device to itself.

    Loaded on this thread and run on another, as the worker does (it loads in its main
    thread and runs batches on a Celery pool thread): on a busy 2-core CPU, the same
    batches run from the thread that loaded the model took 3-7x as long as from another
    one (random-tiny, OpenMP, 2 threads either way), which would credit the pipeline
    with a speed-up that is only this difference."""
    import torch

    engine = load()
    cuda = engine.device.type == "cuda"
    try:
        return _engine_alone(engine, sets, batch_size, "refill" if refill else "drop")
    finally:
        # Engine.speaker's lru_cache sits on the class and holds the engine (self is part
        # of its key): cleared, the engine's weights and caches go with the last reference.
        type(engine).speaker.cache_clear()
        engine = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def _engine_alone(engine: Any, sets: JobSets, batch_size: int, mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from workers.engine.requests import SynthRequest

    from .engine_bench import machine_info, measure_engine, run_engine

    def norm(jobs: Sequence[Any]) -> list[Any]:
        return [SynthRequest(**{**asdict(j), "text": engine.normalize(j.text)}) for j in jobs]

    jobs, realtime = norm(sets.throughput), norm(sets.realtime)

    def measure() -> tuple[Any, Any]:
        run_engine(engine, jobs[:batch_size], batch_size, mode)  # untimed, as `ttspool bench` does
        return (measure_engine(engine, jobs, batch_size, mode=mode),
                measure_engine(engine, realtime, batch_size, "realtime", mode=mode))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-engine") as pool:
        run, short = pool.submit(measure).result()
    return {
        "mode": mode, "audio_s": round(run.audio_s, 4), "wall_s": round(run.wall_s, 4), "audio_s_per_s": round(run.audio_s_per_s, 4),
        "steps": run.steps, "peak_rss_bytes": run.peak_rss_bytes, "peak_gpu_bytes": run.peak_gpu_bytes,
        "realtime_jobs_s": round(short.wall_s, 4), "realtime_jobs_audio_s": round(short.audio_s, 4),
    }, machine_info(engine)


@dataclass(frozen=True)
class Recorded:
    job_id: str
    stored: float  # time.perf_counter() when the result was seen
    meta: dict[str, Any]

    def duration_s(self, allow_cached: bool = False) -> float:
        """The audio seconds the worker recorded; RuntimeError for anything but a fresh SUCCESS."""
        result = self.meta.get("result")
        if self.meta.get("status") != JobState.SUCCESS or not isinstance(result, dict):
            raise RuntimeError(f"bench job {self.job_id} ended {self.meta.get('status')}: {error_text(result)}")
        if result.get("cached") and not allow_cached:
            raise RuntimeError(f"bench job {self.job_id} was served from storage, not synthesized: "
                               "the stored objects of an earlier run were not cleared")
        return float(result["duration_s"])


def _stats(xs: Sequence[float]) -> dict[str, float]:
    xs = sorted(xs)
    # Inclusive: with a handful of jobs the exclusive method would extrapolate past the max.
    p99 = statistics.quantiles(xs, n=100, method="inclusive")[98] if len(xs) > 1 else xs[0]
    return {"jobs": len(xs), "p50_s": round(statistics.median(xs), 4), "p99_s": round(p99, 4),
            "max_s": round(xs[-1], 4)}


class Driver:
    """Submits jobs with the producer API and sees their results recorded. `alive()`
    raises when the worker is gone, so no wait outlives it; `timeout_s` bounds each wait."""

    def __init__(self, settings: Settings, alive: Callable[[], None], timeout_s: float) -> None:
        self.settings = settings
        self.alive = alive
        self.timeout_s = timeout_s
        self.client = Client(settings)
        backend = self.client.app.backend
        self.waiter = ResultWaiter(settings.backend_url, settings.redis_master_name, backend.task_keyprefix.decode(),
                                   key_for=lambda i: backend.get_key_for_task(i).decode(),
                                   decode=backend.decode_result)

    async def __aenter__(self) -> "Driver":
        await self.waiter.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.waiter.close()
        self.client.close()

    def _expect(self, ids: Sequence[str]) -> list[asyncio.Task[Recorded]]:
        """Waits registered before the jobs are sent: a result is never missed, however soon."""
        async def one(job_id: str) -> Recorded:
            meta = await self.waiter.wait(job_id, self.timeout_s)
            return Recorded(job_id, time.perf_counter(), meta)

        return [asyncio.create_task(one(i)) for i in ids]

    async def _submit(self, jobs: Sequence[dict[str, Any]], ids: Sequence[str]) -> float:
        await asyncio.sleep(0)  # let the waits register first
        t0 = time.perf_counter()
        await asyncio.to_thread(self.client.submit_many, [{**j, "job_id": i} for j, i in zip(jobs, ids)])
        return t0

    async def _until(self, waits: Sequence[asyncio.Task[Recorded]], all_done: bool) -> None:
        """Until every wait (or, without all_done, the first) is done; the worker checked on the way."""
        while not (all(w.done() for w in waits) if all_done else any(w.done() for w in waits)):
            self.alive()
            await asyncio.wait(waits, timeout=0.25, return_when=asyncio.FIRST_COMPLETED
                               if not all_done else asyncio.ALL_COMPLETED)

    async def _gather(self, waits: Sequence[asyncio.Task[Recorded]]) -> list[Recorded]:
        try:
            await self._until(waits, all_done=True)
            return [w.result() for w in waits]  # raises the first wait's failure (a TimeoutError)
        finally:
            await _cancel(waits)

    @staticmethod
    def _ids(tag: str, n: int) -> list[str]:
        run = uuid.uuid4().hex[:12]
        return [f"bench-{tag}-{run}-{i}" for i in range(n)]

    async def ready(self) -> float:
        """Seconds until the worker served one job end to end (model loaded and warm,
        storage reachable): what tests/conftest.py's wait_ready waits for too."""
        t0 = time.perf_counter()
        ids = self._ids("ready", 1)
        waits = self._expect(ids)
        await self._submit([{"text": "Warm up.", "priority": "realtime"}], ids)
        [got] = await self._gather(waits)
        got.duration_s(allow_cached=True)
        return time.perf_counter() - t0

    async def throughput(self, jobs: Sequence[dict[str, Any]], tag: str = "throughput") -> dict[str, Any]:
        ids = self._ids(tag, len(jobs))
        waits = self._expect(ids)
        t0 = await self._submit(jobs, ids)
        got = await self._gather(waits)
        audio = sum(r.duration_s() for r in got)
        wall = max(r.stored for r in got) - t0
        return {"jobs": len(jobs), "audio_s": round(audio, 4), "wall_s": round(wall, 4),
                "audio_s_per_s": round(audio / wall, 4)}

    async def latency(self, bulk: Sequence[dict[str, Any]], realtime: Sequence[dict[str, Any]]) -> dict[str, Any]:
        bulk_ids, rt_ids = self._ids("bulk", len(bulk)), self._ids("realtime", len(realtime))
        bulk_waits = self._expect(bulk_ids)
        rt_waits: list[asyncio.Task[Recorded]] = []
        try:
            t_bulk = await self._submit(bulk, bulk_ids)
            await self._until(bulk_waits, all_done=False)  # the first bulk result: the next batch starts
            for w in bulk_waits:
                if w.done():
                    w.result()  # a failed or timed-out first job ends the bench here
            rt_waits = self._expect(rt_ids)
            t_rt = await self._submit(realtime, rt_ids)
            got = await self._gather([*bulk_waits, *rt_waits])
        finally:
            await _cancel([*bulk_waits, *rt_waits])
        by_id = {r.job_id: r for r in got}
        for r in got:
            r.duration_s()
        bulk_s = [by_id[i].stored - t_bulk for i in bulk_ids]
        rt_s = [by_id[i].stored - t_rt for i in rt_ids]
        return {
            "bulk": _stats(bulk_s), "realtime": _stats(rt_s),
            "realtime_submitted_after_s": round(t_rt - t_bulk, 4),
            # Bulk jobs not yet recorded when the realtime ones were sent: the worker was busy.
            "bulk_left_at_realtime_submit": sum(1 for i in bulk_ids if by_id[i].stored > t_rt),
        }


async def _cancel(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class StoragePath(Protocol):
    """The worker's way to storage, as the bench steers it (tasks/cli/bench_pipeline.py)."""

    def set_delay(self, ms: float) -> None: ...
    def round_trips(self) -> int: ...  # storage round trips so far (each waited the delay)
    def clear(self) -> int: ...  # delete what the worker stored; returns how many objects


async def run_workloads(settings: Settings, sets: JobSets, batch_size: int, delays_ms: Sequence[float],
                        storage: StoragePath, alive: Callable[[], None], timeout_s: float,
                        log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Both workloads against a running worker. Stored objects are cleared after every
    pass: the same jobs again would be served from storage (content keys), not synthesized."""
    async def clear() -> None:
        await asyncio.to_thread(storage.clear)

    jobs = [as_job(j, "bulk") for j in sets.throughput]
    async with Driver(settings, alive, timeout_s) as driver:
        ready_s = await driver.ready()
        log(f"worker ready after {ready_s:.1f} s")
        # One untimed pass at the batch size, as the engine had: the worker's first batch
        # of that size pays for heap growth and kernel selection.
        await driver.throughput(jobs[:batch_size], tag="warm")
        await clear()
        runs = []
        for delay in delays_ms:
            storage.set_delay(delay)
            before = storage.round_trips()
            run = {"storage_delay_ms": delay, **await driver.throughput(jobs)}
            run["storage_round_trips"] = storage.round_trips() - before
            log(f"pipeline, storage delay {delay:g} ms: {run['audio_s_per_s']:.2f} audio s/s in {run['wall_s']:.1f} s")
            runs.append(run)
            await clear()
        storage.set_delay(delays_ms[-1])
        lat = await driver.latency([as_job(j, "bulk") for j in sets.bulk],
                                   [as_job(j, "realtime") for j in sets.realtime])
        await clear()
        lat["storage_delay_ms"] = delays_ms[-1]
        log(f"latency: realtime p50 {lat['realtime']['p50_s']:.2f} s, bulk p50 {lat['bulk']['p50_s']:.2f} s")
    return {"pipeline": runs, "latency": lat, "worker_ready_s": round(ready_s, 3)}


def summarize(engine: dict[str, Any], machine: dict[str, Any], work: dict[str, Any], *, batch_size: int,
              jobs: int) -> dict[str, Any]:
    """The JSON of `ttspool bench --pipeline`: ratios to the engine next to the raw numbers."""
    for run in work["pipeline"]:
        run["ratio_to_engine"] = round(run["audio_s_per_s"] / engine["audio_s_per_s"], 4)
    lat = work["latency"]
    lat["realtime_p50_vs_engine"] = round(lat["realtime"]["p50_s"] / engine["realtime_jobs_s"], 4)
    lat["realtime_p99_vs_engine"] = round(lat["realtime"]["p99_s"] / engine["realtime_jobs_s"], 4)
    return {
        "model": machine["model"], "device": machine["device"], "dtype": machine["dtype"], "quant": machine["quant"],
        "batch_size": batch_size, "jobs": jobs, "engine": engine, **work, "machine": machine,
    }

