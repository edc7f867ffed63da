"""`ttspool bench --gateway URL`: what the HTTP gateway adds, against a running stack.

Side by side on the same broker and workers: N jobs submitted with the Python client
(latency: submit to recorded result, seen on Redis pub/sub as the gateway sees it),
then N concurrent `POST /v1/audio/speech` requests (latency: request to the last byte
of the audio). Then one long multi-sentence input, streamed: time to the first audio
against the time to the whole. Torch-free: it is a client.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import string
import time
from typing import Any, Callable

import httpx

from tasks.celery_app import make_app
from tasks.result_waiter import ResultWaiter
from tasks.producer import Client
from tasks.settings import Settings

def long_input(rng: random.Random) -> str:
    """Six sentences, about three segments; a fresh word in each, or a rerun is served from storage."""
    return " ".join(
        f"Part {_word(rng)}: the evening train to the coast leaves from the far platform, and the guard checks "
        "every ticket twice before the doors close for the long ride along the river." for _ in range(6)
    )


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=8))


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=100) if len(xs) > 1 else [xs[0]] * 99
    return {"p50_s": round(statistics.median(xs), 4), "p99_s": round(q[98], 4), "max_s": round(xs[-1], 4)}


async def _direct(settings: Settings, texts: list[str]) -> list[float]:
    celery = make_app(settings)
    waiter = ResultWaiter(settings.backend_url, settings.redis_master_name, celery.backend.task_keyprefix.decode(),
                          key_for=lambda i: celery.backend.get_key_for_task(i).decode(),
                          decode=celery.backend.decode_result)
    client = Client(settings)
    await waiter.start()
    try:
        async def one(text: str) -> float:
            t0 = time.perf_counter()
            [job_id] = await asyncio.to_thread(client.submit_many, [{"text": text, "priority": "realtime",
                                                                     "format": "pcm"}])
            meta = await waiter.wait(job_id, 600)
            if meta.get("status") != "SUCCESS":
                raise RuntimeError(f"job {job_id} failed: {meta.get('result')}")
            return time.perf_counter() - t0

        return list(await asyncio.gather(*(one(t) for t in texts)))
    finally:
        await waiter.close()
        client.close()


async def _gateway(url: str, headers: dict[str, str], texts: list[str], concurrency: int) -> tuple[list[float], int]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    errors = 0
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=600) as http:
        async def one(text: str) -> float | None:
            nonlocal errors
            t0 = time.perf_counter()
            r = await http.post("/v1/audio/speech", json={"model": "chattts", "input": text, "voice": "alloy",
                                                         "response_format": "pcm"})
            if r.status_code != 200 or not r.content:
                errors += 1
                return None
            return time.perf_counter() - t0

        results = await asyncio.gather(*(one(t) for t in texts))
    return [r for r in results if r is not None], errors


async def _stream(url: str, headers: dict[str, str], text: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as http:
        t0 = time.perf_counter()
        first = None
        size = 0
        body = {"model": "chattts", "input": text, "voice": "echo", "response_format": "pcm", "stream": True}
        async with http.stream("POST", "/v1/audio/speech", json=body) as r:
            r.raise_for_status()
            segments = len(r.headers["x-job-ids"].split(","))
            async for chunk in r.aiter_bytes():
                if chunk and first is None:
                    first = time.perf_counter() - t0
                size += len(chunk)
        total = time.perf_counter() - t0
    return {"segments": segments, "audio_s": round(size / 48000, 3), "first_audio_s": round(first or total, 3),
            "total_s": round(total, 3)}


def _rss(url: str) -> float | None:
    text = httpx.get(url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    return None


def bench_gateway(url: str, key: str | None, settings: Settings, jobs: int, concurrency: int,
                  log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    # Fresh texts every run: a repeated one is a cache hit, which would measure storage.
    rng = random.Random()
    warm = [f"Warm up {_word(rng)}." for _ in range(4)]
    asyncio.run(_gateway(url, headers, warm, 4))
    rss_before = _rss(url)
    direct = asyncio.run(_direct(settings, [f"Direct request {_word(rng)}, please." for _ in range(jobs)]))
    log(f"python client: p50 {statistics.median(direct):.3f} s")
    via, errors = asyncio.run(_gateway(url, headers, [f"Gateway request {_word(rng)}, please." for _ in range(jobs)],
                                       concurrency))
    log(f"gateway: p50 {statistics.median(via):.3f} s, {errors} errors")
    rss_after = _rss(url)
    stream = asyncio.run(_stream(url, headers, long_input(rng)))
    log(f"stream: first audio {stream['first_audio_s']} s of {stream['total_s']} s")
    d, g = _stats(direct), _stats(via)
    return {
        "jobs": jobs, "concurrency": concurrency, "errors": errors,
        "direct": d, "gateway": g,
        "added": {"p50_s": round(g["p50_s"] - d["p50_s"], 4), "p99_s": round(g["p99_s"] - d["p99_s"], 4)},
        "gateway_rss_bytes": {"before": rss_before, "after": rss_after},
        "stream": stream,
    }
