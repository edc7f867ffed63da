"""What the gateway's routes share, as FastAPI dependencies: the gateway's state (one
per app, built by create_app), the tenant of the request's API key, the checked path
parameters (a job id, a voice name), and the probes of /healthz."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Awaitable, Callable, Protocol, TypeVar

import anyio
from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from .. import job_records
from ..claims import Claim, claim_key, is_task_id, task_id
from ..celery_app import make_app
from ..producer import Client, error_text
from ..schema import NAME
from ..settings import Settings
from ..states import JobState
from ..voices import Store, VoiceLibrary, check_name
from .api_keys import ApiKeys, admin_keys
from ..result_waiter import ResultWaiter

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))
# A health probe's bound, and how long its answer serves later checks.
PROBE_TIMEOUT_S = 2.0
PROBE_KEEP_S = 2.0
# What the storage probe asks for: whether it exists does not matter, that storage answers does.
PROBE_KEY = "ttspool-health-probe"
T = TypeVar("T")


class Storage(Store, Protocol):
    """What the gateway needs of a store (storage.Storage, handed in by the CLI)."""

    @property
    def base_url(self) -> str: ...

    def presigned_url(self, key: str, expires_s: int) -> str: ...
    def url_for(self, key: str) -> str: ...


class GatewayState:
    """The clients and metrics of one gateway app, kept on `app.state.gateway`."""

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.keys = ApiKeys(settings.api_keys)
        self.admin_keys = admin_keys(settings, self.keys)
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
        # Storage calls wait for a thread of their own: a store that stops answering
        # holds these, while the Redis calls keep anyio's default threads.
        self.storage_pool = anyio.CapacityLimiter(settings.http_storage_threads)
        self.probes = {"broker": Probe(lambda: self.waiter.ping(PROBE_TIMEOUT_S)),
                       "storage": Probe(self._storage_answers)}

    async def _storage_answers(self) -> bool:
        # Its own thread, not the storage pool's: a pool busy with healthy reads is no outage.
        await anyio.to_thread.run_sync(self.storage.exists, PROBE_KEY)
        return True

    async def in_storage_pool(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` (a storage call) on a thread of the storage pool."""
        return await anyio.to_thread.run_sync(call, *args, limiter=self.storage_pool)

    async def submit(self, jobs: list[dict[str, Any]]) -> list[str]:
        """The jobs' task ids. Each job carries the key's tenant, in whose id space its id
        lies (tasks/claims.py)."""
        # Enqueueing is a few quick Redis calls through the sync client: a worker thread
        # for those only. Waiting for the audio holds no thread (ResultWaiter).
        ids: list[str] = await anyio.to_thread.run_sync(self.client.submit_many, jobs)
        return ids

    async def audio_of(self, meta: dict[str, Any]) -> bytes:
        result = meta.get("result")
        if meta.get("status") != JobState.SUCCESS or not isinstance(result, dict):
            raise HTTPException(502, f"synthesis failed: {error_text(result)}")
        key = job_records.audio_key(self.storage.base_url, result["url"])
        return await self.in_storage_pool(self.storage.get_bytes, key)

    async def task_of(self, job_id: str, tenant: str | None) -> str:
        """The task id a request's job id names: in the key's tenant's space, so a tenant
        reaches only its own jobs and cannot tell which ids another uses."""
        if tenant is None:
            return job_id
        scoped = task_id(tenant, job_id)
        own, bare = await anyio.to_thread.run_sync(self.client.redis.mget, [claim_key(scoped), claim_key(job_id)])
        # A job the tenant sent before ids were per tenant, still in the result window:
        # its id is bare, its claim names the tenant. (Past the window its durable record
        # is found under the scoped id, tasks/job_records.py.)
        if own is None and bare is not None and Claim.decode(bare).tenant == tenant:
            return job_id
        return scoped


def gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


State = Annotated[GatewayState, Depends(gateway_state)]

# The OpenAPI document's security scheme (the docs' Authorize button). It refuses
# nothing itself: tenant_of and the voice routes answer 401 in OpenAI's error shape,
# and a gateway without keys takes requests without one.
bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                    description="an API key of TTSPOOL_API_KEYS (a tenant's) or TTSPOOL_ADMIN_KEYS (voice routes)")


def tenant_of(request: Request, state: State) -> str | None:
    """The API key's tenant; None when the gateway has no keys (nobody to tell apart)."""
    if not state.keys.enabled:
        return None
    tenant = state.keys.tenant_for(request.headers.get("authorization"))
    if tenant is None:
        raise HTTPException(401, "missing or invalid API key (Authorization: Bearer KEY)")
    return tenant


Tenant = Annotated[str | None, Depends(tenant_of)]


def job_id_param(job_id: Annotated[str, Path(description="a job id: 1-128 of A-Z a-z 0-9 . _ -")],
                 tenant: Tenant) -> str:
    """The `{job_id}` of a route: 400 for what cannot be a job id, before any lookup. A
    key's ids are its own (its tenant is implied); without keys, any task id, a tenant's
    ("TENANT:ID", tasks/claims.py) included."""
    if not (NAME.fullmatch(job_id) if tenant is not None else is_task_id(job_id)):
        raise HTTPException(400, "a job id is 1-128 characters of letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit")
    return job_id


def voice_name_param(name: Annotated[str, Path(description="a voice name (GET /v1/voices)")]) -> str:
    """The `{name}` of a voice route: VoiceError (400) for what cannot be a voice name."""
    return check_name(name)


JobIdParam = Annotated[str, Depends(job_id_param)]
VoiceNameParam = Annotated[str, Depends(voice_name_param)]


class Probe:
    """One dependency's health for /healthz: "ok" or what is wrong. At most one check
    runs at a time, for at most PROBE_TIMEOUT_S per health request, and its answer is
    kept PROBE_KEEP_S: health checks cannot pile up threads or connections on a
    dependency that stopped answering (a stalled check keeps running alone, and every
    request meanwhile is told it is not answering)."""

    def __init__(self, check: Callable[[], Awaitable[bool]]) -> None:
        self._check = check
        self._running: asyncio.Future[bool] | None = None
        self._started = 0.0
        self._answer: str | None = None
        self._answered = 0.0

    async def state(self) -> str:
        now = time.monotonic()
        if self._answer is not None and now - self._answered < PROBE_KEEP_S:
            return self._answer
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._check())
            # Nobody may await a check that outlives its health request: retrieve its error.
            self._running.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._started = now
        try:
            result = await asyncio.wait_for(asyncio.shield(self._running),
                                            max(0.0, PROBE_TIMEOUT_S - (now - self._started)))
            answer = "ok" if result else "unreachable"
        except asyncio.TimeoutError:
            answer = f"not answering within {PROBE_TIMEOUT_S:g} s"
        except Exception as exc:  # what the dependency said is the answer, not a failed health check
            answer = f"failing: {type(exc).__name__}"
        self._answer, self._answered = answer, time.monotonic()
        return answer


def content_type(fmt: str) -> str:
    # tasks/audio.py's encoders load their libraries only when called.
    from ..audio import FORMATS

    return FORMATS[fmt].content_type
