"""Operations: the health check, Prometheus metrics and the web page."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .deps import State

_PAGE = Path(__file__).with_name("page.html")

router = APIRouter()


@router.get("/healthz")
async def healthz(state: State) -> JSONResponse:
    """Readiness: 200 while the broker and storage answer, 503 naming the one that does
    not. Each probe is bounded and its answer kept briefly (deps.Probe)."""
    names = list(state.probes)
    answers = dict(zip(names, await asyncio.gather(*(state.probes[n].state() for n in names))))
    down = [n for n, a in answers.items() if a != "ok"]
    status = "ok" if not down else "; ".join(f"{n} {answers[n]}" for n in down)
    return JSONResponse({"status": status, "checks": answers}, 503 if down else 200)


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
async def page() -> HTMLResponse:
    return HTMLResponse(_PAGE.read_text(encoding="utf-8"))
