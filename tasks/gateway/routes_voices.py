"""The voice library: list, read, add and remove voices (tasks/voices.py), in the
caller's space.

- A tenant's API key acts on that tenant's space: it sees its own voices, the shared
  ones and the built-ins, and changes its own only (403 for a shared or built-in one).
- An admin key (TTSPOOL_ADMIN_KEYS) is the operator's: it acts on the shared space, or
  on the tenant's named by `?tenant=`.
- A gateway without any keys listens on loopback only: whoever reaches it is the
  operator. With admin keys but no API keys, a request without an admin key may read
  voices and change none.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from ..voices import VoiceLibrary, VoiceReadOnly
from .deps import State, VoiceNameParam
from .fixes import http_fix
from .speech import VoiceRequest

router = APIRouter()


@dataclass(frozen=True)
class Caller:
    library: VoiceLibrary  # as the caller's space sees it
    may_change: bool


def voice_caller(request: Request, state: State,
                 tenant: Annotated[str | None, Query(description="an admin key's: the tenant whose voices")] = None,
                 ) -> Caller:
    authorization = request.headers.get("authorization")
    if state.admin_keys.tenant_for(authorization) is not None:
        return Caller(state.voices.scoped(tenant), True)
    if state.keys.enabled:
        own = state.keys.tenant_for(authorization)
        if own is None:
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer KEY)")
        if tenant not in (None, own):
            raise HTTPException(403, "a tenant's key reaches its own voices only")
        return Caller(state.voices.scoped(own), True)
    return Caller(state.voices.scoped(tenant), not state.admin_keys.enabled)


VoiceCaller = Annotated[Caller, Depends(voice_caller)]


def _changing(caller: Caller) -> VoiceLibrary:
    if not caller.may_change:
        raise HTTPException(403, "changing voices takes an admin key (TTSPOOL_ADMIN_KEYS)")
    return caller.library


@router.get("/v1/voices")
@router.get("/v1/audio/voices")
async def voices(caller: VoiceCaller, state: State) -> dict[str, Any]:
    """The voices the caller's space sees: `voices` lists the names (as Kokoro-FastAPI's
    route does), `data` their records, each with its `space` (tenant, shared, builtin)."""
    found = await state.in_storage_pool(caller.library.list)
    return {"voices": [v.name for v in found], "data": [v.summary() for v in found]}


@router.get("/v1/voices/{name}")
async def voice(name: VoiceNameParam, caller: VoiceCaller, state: State) -> dict[str, Any]:
    found = await state.in_storage_pool(caller.library.get, name, True)
    if found is None:
        raise HTTPException(404, f"no voice {name[:40]!r}")
    summary: dict[str, Any] = found.summary()
    return summary


@router.post("/v1/voices", status_code=201)
async def add_voice(req: VoiceRequest, caller: VoiceCaller, state: State) -> dict[str, Any]:
    """Add a voice from a seed, a speaker string, a mix ("a:0.7,b:0.3") or a recording
    (`audio`: the file, base64) with its `transcript`; `replace` makes a new version (and
    in a tenant's space, the tenant's own voice in place of a shared or built-in one)."""
    library = _changing(caller)
    try:
        audio = base64.b64decode(req.audio, validate=True) if req.audio is not None else None
    except binascii.Error:
        raise HTTPException(400, "audio: not base64") from None
    added = await state.in_storage_pool(lambda: library.add(
        req.name, seed=req.seed, speaker=req.speaker, recording=audio, transcript=req.transcript, mix=req.mix,
        description=req.description, replace=req.replace))
    summary: dict[str, Any] = added.summary()
    return summary


@router.delete("/v1/voices/{name}")
async def remove_voice(name: VoiceNameParam, caller: VoiceCaller, state: State) -> dict[str, Any]:
    library = _changing(caller)
    try:
        gone = await state.in_storage_pool(library.remove, name)
    except VoiceReadOnly as err:
        raise HTTPException(403, str(err) + http_fix(err)) from None
    return {"name": gone.name, "version": gone.version, "removed": True}
