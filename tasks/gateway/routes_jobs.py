"""The job API: submit jobs, read their status and their audio."""

from __future__ import annotations

from typing import Annotated, Any, Union

import anyio
from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import Field, RootModel, TypeAdapter
from pydantic.json_schema import GetJsonSchemaHandler, JsonSchemaValue
from pydantic_core import CoreSchema

from .. import job_records
from ..claims import split_task_id
from ..producer import JobStatus
from ..schema import JobSpec
from ..states import JobState
from .deps import GatewayState, JobIdParam, State, Tenant, content_type

router = APIRouter()

_JOBS = TypeAdapter(Union[JobSpec, Annotated[list[JobSpec], Field(min_length=1)]])


class JobBody(RootModel[Any]):
    """One job object or a non-empty list of them: the fields of `ttspool.synthesize`."""

    # The documented shape is JobSpec's; the body is taken as any JSON and checked by
    # the producer (tasks.schema.parse_job), whose 400 names the offending field the
    # way the CLI and the Python API do.
    @classmethod
    def __get_pydantic_json_schema__(cls, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {**handler(_JOBS.core_schema), "title": "JobBody", "description": cls.__doc__,
                "examples": [{"text": "Your code is 482913.", "voice": "alloy", "format": "mp3", "job_id": "order-1"}]}


@router.post("/v1/jobs", status_code=202)
async def submit_jobs(state: State, tenant: Tenant, body: JobBody) -> dict[str, list[str]]:
    """One job object or a list of them (the fields of `ttspool.synthesize`)."""
    jobs = body.root if isinstance(body.root, list) else [body.root]
    if not jobs or not all(isinstance(j, dict) for j in jobs):
        raise HTTPException(400, "expected a job object or a non-empty list of them")
    if tenant is not None:
        if any(j.get("tenant") not in (None, tenant) for j in jobs):
            raise HTTPException(403, "a job's tenant must be the API key's own")
        jobs = [{**j, "tenant": tenant} for j in jobs]
    ids = await state.submit(jobs)
    # A tenant's ids as it named them: the task ids' tenant part is the key's own.
    return {"ids": ids if tenant is None else [split_task_id(i)[1] for i in ids]}


@router.get("/v1/jobs/{job_id}")
async def job_status(job_id: JobIdParam, request: Request, tenant: Tenant, state: State) -> dict[str, Any]:
    task = await state.task_of(job_id, tenant)
    # Redis, and storage only for a job Redis let go: the default threads, so that a
    # stalled store holds the reads of such jobs only.
    status: JobStatus = await anyio.to_thread.run_sync(state.client.status, task)
    # PENDING is also what Celery says of an id it never saw: an id with no claim (and so
    # no record either, or status would have read it) was never submitted.
    if status.status == JobState.PENDING and \
            await anyio.to_thread.run_sync(state.client.owner, task) is None:
        raise HTTPException(404, f"no job {job_id!r}")
    out = {**status.to_dict(), "id": job_id}
    if status.status == JobState.SUCCESS and status.url:
        # Where the storage keeps it (a server's path, a bucket's key) is no tenant's
        # business: `url` is this gateway's audio route, `audio_url` a URL to GET.
        own = _own_audio_url(str(request.base_url), job_id)
        out["url"] = own
        out["audio_url"] = await anyio.to_thread.run_sync(_audio_url, state, own, status)
    return out


@router.get("/v1/jobs/{job_id}/audio", response_class=Response)
async def job_audio(job_id: JobIdParam, tenant: Tenant, state: State) -> Response:
    task = await state.task_of(job_id, tenant)
    meta = await state.waiter.get(task)
    if meta is None:
        # Past the result window: the durable record, if the job ended.
        record = await state.in_storage_pool(state.client.record, task)
        if record is not None and record["status"] != JobState.SUCCESS:
            raise HTTPException(502, f"synthesis failed: {record.get('error')}")
        if record is not None:
            meta = {"status": JobState.SUCCESS, "result": record}
    if meta is None or meta.get("status") not in (JobState.SUCCESS, JobState.FAILURE):
        raise HTTPException(404, f"job {job_id!r} has no audio (yet)")
    result = meta.get("result") or {}
    return Response(await state.audio_of(meta), media_type=content_type(result.get("format", "wav")))


def _own_audio_url(base_url: str, job_id: str) -> str:
    return f"{base_url.rstrip('/')}/v1/jobs/{job_id}/audio"


def _audio_url(state: GatewayState, own: str, status: JobStatus) -> str:
    """S3: a presigned HTTPS URL; a local folder: this gateway's own audio route."""
    if status.url and status.url.startswith("s3://"):
        return state.storage.presigned_url(job_records.audio_key(state.storage.base_url, status.url), 3600)
    return own
