"""What the gateway's routes share, as FastAPI dependencies: the gateway's state (one
per app, built by create_app) and the tenant of the request's API key."""

from __future__ import annotations

from typing import Annotated, Any, Protocol

import anyio
from fastapi import Depends, HTTPException, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from .. import job_records
from ..claims import Claim, claim_key, task_id
from ..celery_app import make_app
from ..producer import Client, error_text
from ..settings import Settings
from ..states import JobState
from ..voices import Store, VoiceLibrary
from .api_keys import ApiKeys
from ..result_waiter import ResultWaiter

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))


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
        return await anyio.to_thread.run_sync(self.storage.get_bytes, key)

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


def tenant_of(request: Request, state: State) -> str | None:
    """The API key's tenant; None when the gateway has no keys (nobody to tell apart)."""
    if not state.keys.enabled:
        return None
    tenant = state.keys.tenant_for(request.headers.get("authorization"))
    if tenant is None:
        raise HTTPException(401, "missing or invalid API key (Authorization: Bearer KEY)")
    return tenant


Tenant = Annotated[str | None, Depends(tenant_of)]


def content_type(fmt: str) -> str:
    # tasks/audio.py's encoders load their libraries only when called.
    from ..audio import FORMATS

    return FORMATS[fmt].content_type
