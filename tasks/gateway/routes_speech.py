"""OpenAI's `POST /v1/audio/speech`: waits for the audio, or streams it segment by segment."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import aclosing
from typing import Any, AsyncGenerator, AsyncIterator

import anyio
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse

from ..claims import split_task_id, task_id
from ..states import JobState
from .deps import GatewayState, State, Tenant, content_type
from .speech import STREAMABLE, SpeechRequest, segment_jobs, sse_delta, sse_done, wav_stream_header

# How long a request waits for its audio before answering 504.
WAIT_S = 600.0

router = APIRouter()


@router.post("/v1/audio/speech", response_class=Response,
             responses={200: {"content": {"audio/mpeg": {}, "audio/wav": {}, "text/event-stream": {}},
                              "description": "the audio, or with `stream_format: sse` OpenAI's audio events"}})
async def speech(req: SpeechRequest, request: Request, tenant: Tenant, state: State) -> Response:
    """OpenAI-compatible speech: waits for the audio, or streams it segment by segment."""
    streaming = req.stream or req.stream_format is not None or "chunked" in request.headers.get("te", "")
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
    ids = [task_id(tenant, j["job_id"]) for j in jobs]
    media_type = content_type(fmt)
    # The jobs behind the audio, for GET /v1/jobs/{id} (spoken_text, the stored copy).
    headers = {"X-Job-Ids": ",".join(j["job_id"] for j in jobs)}
    if streaming:
        # The first (short) segment alone first: the rest, sent once a worker has
        # taken it, cannot end up in its batch and hold its audio back.
        await state.submit(jobs[:1])
        pieces = _stream(state, jobs, ids, fmt)
        if req.stream_format == "sse":
            return StreamingResponse(_events(pieces, len(req.input)), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        return StreamingResponse(_audio(pieces), media_type=media_type, headers=headers)
    await state.submit(jobs)
    metas = await asyncio.gather(*(_wait(state, job_id) for job_id in ids))
    blobs = await asyncio.gather(*(state.audio_of(m) for m in metas))
    if seg_fmt == fmt:
        return Response(b"".join(blobs), media_type=media_type, headers=headers)
    audio = await anyio.to_thread.run_sync(_assemble, list(blobs), fmt)
    return Response(audio, media_type=media_type, headers=headers)


async def _wait(state: GatewayState, job_id: str) -> dict[str, Any]:
    try:
        return await state.waiter.wait(job_id, WAIT_S)
    except asyncio.TimeoutError:
        own = split_task_id(job_id)[1]
        raise HTTPException(504, f"job {own} not finished after {WAIT_S:.0f} s; poll GET /v1/jobs/{own}") from None


def _assemble(blobs: list[bytes], fmt: str) -> bytes:
    """Raw PCM16 segments -> one file in `fmt` (without numpy: a gateway install has none)."""
    from ..audio import from_pcm16

    return from_pcm16(b"".join(blobs), 24_000, fmt)


# Each closes its pieces when it ends or the client goes: that cancels the segments' waits.
async def _audio(pieces: AsyncGenerator[tuple[bytes, float], None]) -> AsyncIterator[bytes]:
    async with aclosing(pieces):
        async for audio, _ in pieces:
            yield audio


async def _events(pieces: AsyncGenerator[tuple[bytes, float], None], input_chars: int) -> AsyncIterator[bytes]:
    """The audio stream's bytes as OpenAI's events: together, the same bytes."""
    seconds = 0.0
    async with aclosing(pieces):
        async for audio, duration_s in pieces:
            seconds += duration_s
            yield sse_delta(audio)
    yield sse_done(input_chars, seconds)


async def _stream(state: GatewayState, jobs: list[dict[str, Any]], ids: list[str],
                  fmt: str) -> AsyncGenerator[tuple[bytes, float], None]:
    """Each segment (`ids`: their task ids) as soon as it and those before it are done, in
    order, with the seconds of audio it holds."""
    if fmt == "wav":
        yield wav_stream_header(24_000), 0.0
    if len(jobs) > 1:
        for _ in range(200):  # up to 10 s; a busy pool may hold the first one longer
            meta = await state.waiter.get(ids[0])
            if meta is not None and meta.get("status") != JobState.PENDING:
                break
            await asyncio.sleep(0.05)
        # Taken (STARTED) is not yet running: an idle worker waits TTSPOOL_MAX_WAIT_MS
        # for company first, one scheduler tick (at most 50 ms) at a time.
        await asyncio.sleep(state.settings.max_wait_ms / 1000 + 0.1)
        await state.submit(jobs[1:])
    waits = [asyncio.ensure_future(state.waiter.wait(job_id, WAIT_S)) for job_id in ids]
    try:
        for fut in waits:
            meta = await fut
            audio = await state.audio_of(meta)
            yield (await anyio.to_thread.run_sync(_mp3_frames, audio) if fmt == "mp3" else audio,
                   float(meta["result"].get("duration_s") or 0.0))
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
