"""Operations: the health check, Prometheus metrics and the web page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .deps import State

_PAGE = Path(__file__).with_name("page.html")

router = APIRouter()


@router.get("/healthz")
async def healthz(state: State) -> JSONResponse:
    ok = await state.waiter.ping()
    return JSONResponse({"status": "ok" if ok else "broker unreachable"}, 200 if ok else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
async def page() -> HTMLResponse:
    return HTMLResponse(_PAGE.read_text(encoding="utf-8"))
