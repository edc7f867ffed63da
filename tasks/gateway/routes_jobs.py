"""The job API: submit jobs, read their status and their audio."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Body, HTTPException, Request, Response

from .. import job_records
from ..producer import JobStatus
from ..states import JobState
from .deps import GatewayState, JobIdParam, State, Tenant, content_type

router = APIRouter()


@router.post("/v1/jobs", status_code=202)
async def submit_jobs(state: State, tenant: Tenant,
                      body: dict[str, Any] | list[dict[str, Any]] = Body(...)) -> dict[str, list[str]]:
    """One job object or a list of them (the fields of `ttspool.synthesize`)."""
    jobs = body if isinstance(body, list) else [body]
    if not jobs or not all(isinstance(j, dict) for j in jobs):
        raise HTTPException(400, "expected a job object or a non-empty list of them")
    if tenant is not None:
        if any(j.get("tenant") not in (None, tenant) for j in jobs):
            raise HTTPException(403, "a job's tenant must be the API key's own")
        jobs = [{**j, "tenant": tenant} for j in jobs]
    return {"ids": await state.submit(jobs)}


@router.get("/v1/jobs/{job_id}")
async def job_status(job_id: JobIdParam, request: Request, tenant: Tenant, state: State) -> dict[str, Any]:
    await state.owned(job_id, tenant)
    status: JobStatus = await anyio.to_thread.run_sync(state.client.status, job_id)
    out = status.to_dict()
    if status.status == JobState.SUCCESS and status.url:
        out["audio_url"] = await anyio.to_thread.run_sync(_audio_url, state, job_id, status, str(request.base_url))
    return out


@router.get("/v1/jobs/{job_id}/audio", response_class=Response)
async def job_audio(job_id: JobIdParam, tenant: Tenant, state: State) -> Response:
    await state.owned(job_id, tenant)
    meta = await state.waiter.get(job_id)
    if meta is None:
        # Past the result window: the durable record, if the job ended.
        record = await anyio.to_thread.run_sync(state.client.record, job_id)
        if record is not None and record["status"] != JobState.SUCCESS:
            raise HTTPException(502, f"synthesis failed: {record.get('error')}")
        if record is not None:
            meta = {"status": JobState.SUCCESS, "result": record}
    if meta is None or meta.get("status") not in (JobState.SUCCESS, JobState.FAILURE):
        raise HTTPException(404, f"job {job_id!r} has no audio (yet)")
    result = meta.get("result") or {}
    return Response(await state.audio_of(meta), media_type=content_type(result.get("format", "wav")))


def _audio_url(state: GatewayState, job_id: str, status: JobStatus, base_url: str) -> str:
    """S3: a presigned HTTPS URL; a local folder: this gateway's own audio route."""
    if status.url and status.url.startswith("s3://"):
        return state.storage.presigned_url(job_records.audio_key(state.storage.base_url, status.url), 3600)
    return f"{base_url.rstrip('/')}/v1/jobs/{job_id}/audio"
