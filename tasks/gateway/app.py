"""The gateway's app (FastAPI on uvicorn), see tasks/gateway/__init__.py: the routers,
each resource's own (routes_*.py), on the state and tenant dependencies of deps.py,
with the errors in OpenAI's shape, body limits and request metrics."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import redis
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from kombu.exceptions import OperationalError

from ..errors import RateLimited, TtspoolError
from ..schema import JobValidationError
from ..settings import Settings
from ..voices import VoiceError, VoiceNotFound
from . import routes_jobs, routes_ops, routes_speech, routes_voices
from .deps import GatewayState, Storage, gateway_state

log = logging.getLogger(__name__)


def create_app(settings: Settings, storage: Storage) -> FastAPI:
    state = GatewayState(settings, storage)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.waiter.start()
        try:
            yield
        finally:
            await state.waiter.close()
            state.client.close()

    app = FastAPIOffline(title="ttspool", version="1", lifespan=lifespan,
                         description="OpenAI's speech API and a job API on a pool of batched ChatTTS workers.")
    app.state.gateway = state  # where deps.gateway_state finds it for the routes
    app.middleware("http")(_guard)
    for kind, handler in _ERROR_HANDLERS:
        app.exception_handler(kind)(handler)
    # In this order, the OpenAPI document's.
    for routes in (routes_speech, routes_voices, routes_jobs, routes_ops):
        app.include_router(routes.router)
    return app


def _error(status: int, message: str, kind: str = "invalid_request_error",
           headers: dict[str, str] | None = None) -> JSONResponse:
    # OpenAI's error shape, so its SDK raises its usual exceptions with our message.
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


async def _guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    state = gateway_state(request)
    limit = state.settings.http_max_body
    t0 = time.perf_counter()
    state.in_flight.inc()
    try:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limit):
            response: Response = _error(413, f"request body over {limit} bytes")
        else:
            _limit_body(request, limit)
            response = await call_next(request)
    finally:
        state.in_flight.dec()
    name = getattr(request.scope.get("route"), "path", "unmatched")
    state.requests.labels(name, str(response.status_code)).inc()
    state.latency.labels(name).observe(time.perf_counter() - t0)
    return response


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


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error",
                  headers=getattr(exc, "headers", None))


async def _unreadable(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(400, "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}"
                                 for e in exc.errors()[:8]))


async def _invalid(request: Request, exc: JobValidationError) -> JSONResponse:
    return _error(400, str(exc))


async def _bad_voice(request: Request, exc: VoiceError) -> JSONResponse:
    return _error(404 if isinstance(exc, VoiceNotFound) else 400, str(exc))


async def _backend_failed(request: Request, exc: TtspoolError) -> JSONResponse:
    # What is left after the handlers above: the object store failed (StorageError,
    # whose message names the object, never credentials).
    log.warning("%s: %s", request.url.path, exc)
    return _error(503, str(exc), "server_error", headers={"Retry-After": "5"})


async def _limited(request: Request, exc: RateLimited) -> JSONResponse:
    return _error(429, str(exc), "rate_limit_error", headers={"Retry-After": str(max(1, round(exc.retry_after_s + 0.5)))})


async def _broker_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("broker unreachable: %s", exc)
    return _error(503, "the queue (Redis) is unreachable; try again", "server_error", headers={"Retry-After": "5"})


# Starlette picks the handler of the exception's nearest class, so the order here is free.
_ERROR_HANDLERS: tuple[tuple[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]], ...] = (
    (HTTPException, _http_error),
    (RequestValidationError, _unreadable),
    (JobValidationError, _invalid),
    (VoiceError, _bad_voice),
    (TtspoolError, _backend_failed),
    (RateLimited, _limited),
    (redis.RedisError, _broker_down),
    (OperationalError, _broker_down),
    (ConnectionError, _broker_down),
)
