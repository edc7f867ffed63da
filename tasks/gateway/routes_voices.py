"""The voice library: list, read, add and remove voices (tasks/voices.py)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import anyio
from fastapi import APIRouter, Depends, HTTPException

from .deps import State, VoiceNameParam, tenant_of
from .speech import VoiceRequest

# One library for every tenant, but only for holders of a key.
router = APIRouter(dependencies=[Depends(tenant_of)])


@router.get("/v1/voices")
@router.get("/v1/audio/voices")
async def voices(state: State) -> dict[str, Any]:
    """The voice library: `voices` lists the names (as Kokoro-FastAPI's route does),
    `data` their records."""
    found = await anyio.to_thread.run_sync(state.voices.list)
    return {"voices": [v.name for v in found], "data": [v.summary() for v in found]}


@router.get("/v1/voices/{name}")
async def voice(name: VoiceNameParam, state: State) -> dict[str, Any]:
    found = await anyio.to_thread.run_sync(state.voices.get, name, True)
    if found is None:
        raise HTTPException(404, f"no voice {name[:40]!r}")
    summary: dict[str, Any] = found.summary()
    return summary


@router.post("/v1/voices", status_code=201)
async def add_voice(req: VoiceRequest, state: State) -> dict[str, Any]:
    """Add a voice from a seed, a speaker string, a mix ("a:0.7,b:0.3") or a recording
    (`audio`: the file, base64) with its `transcript`; `replace` makes a new version."""
    try:
        audio = base64.b64decode(req.audio, validate=True) if req.audio is not None else None
    except binascii.Error:
        raise HTTPException(400, "audio: not base64") from None
    added = await anyio.to_thread.run_sync(lambda: state.voices.add(
        req.name, seed=req.seed, speaker=req.speaker, recording=audio, transcript=req.transcript, mix=req.mix,
        description=req.description, replace=req.replace))
    summary: dict[str, Any] = added.summary()
    return summary


@router.delete("/v1/voices/{name}")
async def remove_voice(name: VoiceNameParam, state: State) -> dict[str, Any]:
    gone = await anyio.to_thread.run_sync(state.voices.remove, name)
    return {"name": gone.name, "version": gone.version, "removed": True}
