"""The gateway's routes (FastAPI on uvicorn); see tasks/gateway/__init__.py."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import anyio
import redis
from fastapi import Body, Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from kombu.exceptions import OperationalError
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)

from .. import job_records
from ..app import make_app
from ..errors import RateLimited, TtspoolError
from ..producer import Client, JobStatus, error_text
from ..schema import JobValidationError
from ..settings import Settings
from ..states import JobState
from ..voices import Store, VoiceError, VoiceLibrary, VoiceNotFound
from .keys import ApiKeys
from .results import ResultWaiter
from .speech import STREAMABLE, SpeechRequest, VoiceRequest, segment_jobs, wav_stream_header

log = logging.getLogger(__name__)

# How long a request waits for its audio before answering 504.
WAIT_S = 600.0
_PAGE = Path(__file__).with_name("page.html")
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))


class Storage(Store, Protocol):
    """What the gateway needs of a store (storage.Storage, handed in by the CLI)."""

    @property
    def base_url(self) -> str: ...

    def presigned_url(self, key: str, expires_s: int) -> str: ...
    def url_for(self, key: str) -> str: ...


def _error(status: int, message: str, kind: str = "invalid_request_error",
           headers: dict[str, str] | None = None) -> JSONResponse:
    # OpenAI's error shape, so its SDK raises its usual exceptions with our message.
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


class Gateway:
    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.keys = ApiKeys(settings.api_keys)
        self.client = Client(settings, storage=storage)
        self.voices = VoiceLibrary(storage, self.client.redis)
        celery = make_app(settings)
        self.waiter = ResultWaiter(
            settings.backend_url, settings.redis_master_name, celery.backend.task_keyprefix.decode(),
            key_for=lambda job_id: celery.backend.get_key_for_task(job_id).decode(),
            decode=celery.backend.decode_result,
        )
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # memory and file descriptors of the gateway
        self.requests = Counter("ttspool_gateway_requests", "HTTP requests, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("ttspool_gateway_request_seconds", "Time to the response's last byte, by route",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("ttspool_gateway_in_flight_requests", "Requests being served", registry=self.registry)

    # -- helpers --------------------------------------------------------------------

    async def submit(self, jobs: list[dict[str, Any]]) -> list[str]:
        # Enqueueing is a few quick Redis calls through the sync client: a worker thread
        # for those only. Waiting for the audio holds no thread (ResultWaiter).
        # Each job carries the key's tenant, which its id's claim records (tasks/claims.py).
        ids: list[str] = await anyio.to_thread.run_sync(self.client.submit_many, jobs)
        return ids

    async def audio_of(self, meta: dict[str, Any]) -> bytes:
        result = meta.get("result")
        if meta.get("status") != JobState.SUCCESS or not isinstance(result, dict):
            raise HTTPException(502, f"synthesis failed: {error_text(result)}")
        key = job_records.audio_key(self.storage.base_url, result["url"])
        return await anyio.to_thread.run_sync(self.storage.get_bytes, key)

    async def owned(self, job_id: str, tenant: str | None) -> None:
        """With API keys, a tenant sees only its own jobs: those submitted with its tenant,
        through this gateway or any other producer."""
        if tenant is None:
            return
        claim = await anyio.to_thread.run_sync(self.client.owner, job_id)
        if claim is not None:
            owner = claim.tenant
        else:
            # Claims go with the result window; a job past it names its tenant in its record.
            record = await anyio.to_thread.run_sync(job_records.read, self.storage, job_id)
            owner = (record or {}).get("params", {}).get("tenant")
        if owner != tenant:
            raise HTTPException(404, f"no job {job_id!r}")


def create_app(settings: Settings, storage: Storage) -> FastAPI:
    gw = Gateway(settings, storage)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.waiter.start()
        try:
            yield
        finally:
            await gw.waiter.close()
            gw.client.close()

    app = FastAPIOffline(title="ttspool", version="1", lifespan=lifespan,
                         description="OpenAI's speech API and a job API on a pool of batched ChatTTS workers.")
    app.state.gateway = gw

    async def tenant_of(request: Request) -> str | None:
        if not gw.keys.enabled:
            return None
        tenant = gw.keys.tenant_for(request.headers.get("authorization"))
        if tenant is None:
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer KEY)")
        return tenant

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        gw.in_flight.inc()
        try:
            size = request.headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > settings.http_max_body):
                response: Response = _error(413, f"request body over {settings.http_max_body} bytes")
            else:
                _limit_body(request, settings.http_max_body)
                response = await call_next(request)
        finally:
            gw.in_flight.dec()
        name = getattr(request.scope.get("route"), "path", "unmatched")
        gw.requests.labels(name, str(response.status_code)).inc()
        gw.latency.labels(name).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error",
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def unreadable(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}"
                                     for e in exc.errors()[:8]))

    @app.exception_handler(JobValidationError)
    async def invalid(request: Request, exc: JobValidationError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(VoiceError)
    async def bad_voice(request: Request, exc: VoiceError) -> JSONResponse:
        return _error(404 if isinstance(exc, VoiceNotFound) else 400, str(exc))

    @app.exception_handler(TtspoolError)
    async def backend_failed(request: Request, exc: TtspoolError) -> JSONResponse:
        # What is left after the handlers above: the object store failed (StorageError,
        # whose message names the object, never credentials).
        log.warning("%s: %s", request.url.path, exc)
        return _error(503, str(exc), "server_error", headers={"Retry-After": "5"})

    @app.exception_handler(RateLimited)
    async def limited(request: Request, exc: RateLimited) -> JSONResponse:
        return _error(429, str(exc), "rate_limit_error", headers={"Retry-After": str(max(1, round(exc.retry_after_s + 0.5)))})

    async def broker_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("broker unreachable: %s", exc)
        return _error(503, "the queue (Redis) is unreachable; try again", "server_error", headers={"Retry-After": "5"})

    for kind in (redis.RedisError, OperationalError, ConnectionError):
        app.add_exception_handler(kind, broker_down)

    # -- OpenAI -------------------------------------------------------------------

    @app.post("/v1/audio/speech", response_class=Response,
              responses={200: {"content": {"audio/mpeg": {}, "audio/wav": {}}, "description": "the audio"}})
    async def speech(req: SpeechRequest, request: Request, tenant: str | None = Depends(tenant_of)) -> Response:
        """OpenAI-compatible speech: waits for the audio, or streams it segment by segment."""
        streaming = req.stream or req.stream_format == "audio" or "chunked" in request.headers.get("te", "")
        fmt = req.response_format
        if streaming and fmt not in STREAMABLE:
            raise HTTPException(400, f"{fmt} cannot be streamed; use one of {', '.join(sorted(STREAMABLE))}")
        try:
            jobs = segment_jobs(req, tenant, "pcm", short_first=streaming)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        # One segment: the worker makes the file. Several: raw PCM per segment, made
        # into one file here, or, streamed, one WAV header and then the PCM; MP3, AAC
        # and Opus stream as whole files per segment, played one after another.
        if len(jobs) == 1 and not streaming:
            seg_fmt = fmt
        else:
            seg_fmt = "pcm" if not streaming or fmt in ("wav", "pcm") else fmt
        jobs = [{**j, "format": seg_fmt, "job_id": uuid.uuid4().hex} for j in jobs]
        ids = [j["job_id"] for j in jobs]
        content_type = _content_type(fmt)
        # The jobs behind the audio, for GET /v1/jobs/{id} (spoken_text, the stored copy).
        headers = {"X-Job-Ids": ",".join(ids)}
        if streaming:
            # The first (short) segment alone first: the rest, sent once a worker has
            # taken it, cannot end up in its batch and hold its audio back.
            await gw.submit(jobs[:1])
            return StreamingResponse(_stream(gw, jobs, tenant, fmt), media_type=content_type, headers=headers)
        await gw.submit(jobs)
        metas = await asyncio.gather(*(_wait(gw, job_id) for job_id in ids))
        blobs = await asyncio.gather(*(gw.audio_of(m) for m in metas))
        if seg_fmt == fmt:
            return Response(b"".join(blobs), media_type=content_type, headers=headers)
        audio = await anyio.to_thread.run_sync(_assemble, list(blobs), fmt)
        return Response(audio, media_type=content_type, headers=headers)

    @app.get("/v1/voices")
    @app.get("/v1/audio/voices")
    async def voices(tenant: str | None = Depends(tenant_of)) -> dict[str, Any]:
        """The voice library: `voices` lists the names (as Kokoro-FastAPI's route does),
        `data` their records."""
        found = await anyio.to_thread.run_sync(gw.voices.list)
        return {"voices": [v.name for v in found], "data": [v.summary() for v in found]}

    @app.get("/v1/voices/{name}")
    async def voice(name: str, tenant: str | None = Depends(tenant_of)) -> dict[str, Any]:
        found = await anyio.to_thread.run_sync(gw.voices.get, name, True)
        if found is None:
            raise HTTPException(404, f"no voice {name[:40]!r}")
        summary: dict[str, Any] = found.summary()
        return summary

    @app.post("/v1/voices", status_code=201)
    async def add_voice(req: VoiceRequest, tenant: str | None = Depends(tenant_of)) -> dict[str, Any]:
        """Add a voice from a seed, a speaker string, a mix ("a:0.7,b:0.3") or a recording
        (`audio`: the file, base64) with its `transcript`; `replace` makes a new version."""
        try:
            audio = base64.b64decode(req.audio, validate=True) if req.audio is not None else None
        except binascii.Error:
            raise HTTPException(400, "audio: not base64") from None
        added = await anyio.to_thread.run_sync(lambda: gw.voices.add(
            req.name, seed=req.seed, speaker=req.speaker, recording=audio, transcript=req.transcript, mix=req.mix,
            description=req.description, replace=req.replace))
        summary: dict[str, Any] = added.summary()
        return summary

    @app.delete("/v1/voices/{name}")
    async def remove_voice(name: str, tenant: str | None = Depends(tenant_of)) -> dict[str, Any]:
        gone = await anyio.to_thread.run_sync(gw.voices.remove, name)
        return {"name": gone.name, "version": gone.version, "removed": True}

    # -- jobs ---------------------------------------------------------------------

    @app.post("/v1/jobs", status_code=202)
    async def submit_jobs(body: dict[str, Any] | list[dict[str, Any]] = Body(...),
                          tenant: str | None = Depends(tenant_of)) -> dict[str, list[str]]:
        """One job object or a list of them (the fields of `ttspool.synthesize`)."""
        jobs = body if isinstance(body, list) else [body]
        if not jobs or not all(isinstance(j, dict) for j in jobs):
            raise HTTPException(400, "expected a job object or a non-empty list of them")
        if tenant is not None:
            if any(j.get("tenant") not in (None, tenant) for j in jobs):
                raise HTTPException(403, "a job's tenant must be the API key's own")
            jobs = [{**j, "tenant": tenant} for j in jobs]
        return {"ids": await gw.submit(jobs)}

    @app.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str, request: Request, tenant: str | None = Depends(tenant_of)) -> dict[str, Any]:
        await gw.owned(job_id, tenant)
        status: JobStatus = await anyio.to_thread.run_sync(gw.client.status, job_id)
        out = status.to_dict()
        if status.status == JobState.SUCCESS and status.url:
            out["audio_url"] = await anyio.to_thread.run_sync(_audio_url, gw, job_id, status, str(request.base_url))
        return out

    @app.get("/v1/jobs/{job_id}/audio", response_class=Response)
    async def job_audio(job_id: str, tenant: str | None = Depends(tenant_of)) -> Response:
        await gw.owned(job_id, tenant)
        meta = await gw.waiter.get(job_id)
        if meta is None:
            # Past the result window: the durable record, if the job ended.
            record = await anyio.to_thread.run_sync(gw.client.record, job_id)
            if record is not None and record["status"] != JobState.SUCCESS:
                raise HTTPException(502, f"synthesis failed: {record.get('error')}")
            if record is not None:
                meta = {"status": JobState.SUCCESS, "result": record}
        if meta is None or meta.get("status") not in (JobState.SUCCESS, JobState.FAILURE):
            raise HTTPException(404, f"job {job_id!r} has no audio (yet)")
        result = meta.get("result") or {}
        return Response(await gw.audio_of(meta), media_type=_content_type(result.get("format", "wav")))

    # -- operations ---------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ok = await gw.waiter.ping()
        return JSONResponse({"status": "ok" if ok else "broker unreachable"}, 200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(gw.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(_PAGE.read_text(encoding="utf-8"))

    return app


async def _wait(gw: Gateway, job_id: str) -> dict[str, Any]:
    try:
        return await gw.waiter.wait(job_id, WAIT_S)
    except asyncio.TimeoutError:
        raise HTTPException(504, f"job {job_id} not finished after {WAIT_S:.0f} s; poll GET /v1/jobs/{job_id}") from None


def _limit_body(request: Request, limit: int) -> None:
    """A chunked body has no Content-Length: count it as it is read."""
    receive = request.receive
    seen = 0

    async def counted() -> Any:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise HTTPException(413, f"request body over {limit} bytes")
        return message

    request._receive = counted  # the receive channel the route's body parsing reads


def _content_type(fmt: str) -> str:
    from ..audio import FORMATS

    return FORMATS[fmt].content_type


def _assemble(blobs: list[bytes], fmt: str) -> bytes:
    """Raw PCM16 segments -> one file in `fmt`."""
    import numpy as np

    from ..audio import encode

    pcm = np.frombuffer(b"".join(blobs), dtype="<i2").astype(np.float32) / 32767.0
    return encode(pcm, 24_000, fmt)[0]


async def _stream(gw: Gateway, jobs: list[dict[str, Any]], tenant: str | None, fmt: str) -> AsyncIterator[bytes]:
    """Each segment as soon as it and those before it are done, in order."""
    if fmt == "wav":
        yield wav_stream_header(24_000)
    ids = [j["job_id"] for j in jobs]
    if len(jobs) > 1:
        for _ in range(200):  # up to 10 s; a busy pool may hold the first one longer
            meta = await gw.waiter.get(ids[0])
            if meta is not None and meta.get("status") != JobState.PENDING:
                break
            await asyncio.sleep(0.05)
        # Taken (STARTED) is not yet running: an idle worker waits TTSPOOL_MAX_WAIT_MS
        # for company first, one scheduler tick (at most 50 ms) at a time.
        await asyncio.sleep(gw.settings.max_wait_ms / 1000 + 0.1)
        await gw.submit(jobs[1:])
    waits = [asyncio.ensure_future(gw.waiter.wait(job_id, WAIT_S)) for job_id in ids]
    try:
        for fut in waits:
            audio = await gw.audio_of(await fut)
            yield await anyio.to_thread.run_sync(_mp3_frames, audio) if fmt == "mp3" else audio
    finally:
        for fut in waits:
            fut.cancel()


def _mp3_frames(data: bytes) -> bytes:
    """The audio frames of an MP3 file without its Xing/Info header frame: that frame
    gives the file's length, and a decoder stops there when files are joined."""
    import io

    import av

    with av.open(io.BytesIO(data), format="mp3") as src:
        return b"".join(bytes(p) for p in src.demux(audio=0) if p.size)


def _audio_url(gw: Gateway, job_id: str, status: JobStatus, base_url: str) -> str:
    """S3: a presigned HTTPS URL; a local folder: this gateway's own audio route."""
    if status.url and status.url.startswith("s3://"):
        return gw.storage.presigned_url(job_records.audio_key(gw.storage.base_url, status.url), 3600)
    return f"{base_url.rstrip('/')}/v1/jobs/{job_id}/audio"
