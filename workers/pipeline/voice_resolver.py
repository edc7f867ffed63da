"""Voice names -> what the engine needs, at batch time (tasks/voices.py has the library).

A name is resolved as the job's tenant sees the library: its own voices, then the
shared ones, then the built-ins (a job without a tenant sees the shared space). A worker
reads a named voice from the object store (the truth; the Redis indexes only serve
producers) and keeps it, by tenant and name, for `ttl_s`, so a voice added or replaced anywhere is
used on this worker's next batch after at most that long, without a restart. A
recording's audio codes are computed once per recording (by its digest) with this
worker's own DVAE: they belong to the model, not to the voice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from tasks.errors import JobFailed
from tasks.voices import Embedding, Voice, VoiceLibrary

from workers.engine.requests import Blend, Reference
from workers.engine.requests import Voice as EngineVoice

if TYPE_CHECKING:
    from workers.engine.engine import Engine

log = logging.getLogger(__name__)

_MAX_REFERENCES = 64  # recordings whose codes are kept (a few hundred KB each at most)


@dataclass(frozen=True)
class Resolved:
    voice: EngineVoice  # what the engine synthesizes with
    key: Any  # the content key's voice: the job's own value, or the library voice's digest
    label: dict[str, Any] | None = None  # a library voice's name, version and space, for results


class VoiceResolver:
    def __init__(self, library: VoiceLibrary, engine: Engine, normalize: Callable[[str], str],
                 ttl_s: float = 5.0) -> None:
        self.library = library
        self.engine = engine
        self.normalize = normalize  # a transcript is read like a job's text
        self.ttl_s = ttl_s
        # One batch function call at a time (celery-batches): no locking needed.
        self._voices: dict[tuple[str | None, str], tuple[float, Voice | None]] = {}
        self._references: dict[str, Reference] = {}

    def resolve(self, voice: int | str, name: str | None, tenant: str | None) -> Resolved:
        """`tenant`: the job's. Raises JobFailed (reason "voice") for a name that is not in
        the library as the tenant sees it, or a voice the model cannot use."""
        try:
            if name is None:
                self.engine.speaker(voice)  # a speaker string of the wrong size fails here
                return Resolved(voice, voice)
            record = self._lookup(tenant, name)
            if record is None:
                whose = "the voice library" if tenant is None else f"tenant {tenant!r}'s voices or the shared ones"
                raise JobFailed(f"voice {name!r} is not in {whose} (removed after the job was sent?)",
                                reason="voice")
            engine_voice = self._engine_voice(record)
            self.engine.speaker(engine_voice)
        except ValueError as err:
            raise JobFailed(str(err), reason="voice") from None
        return Resolved(engine_voice, {"library": record.digest}, record.label)

    def _lookup(self, tenant: str | None, name: str) -> Voice | None:
        now = time.monotonic()
        hit = self._voices.get((tenant, name))
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        record = self.library.scoped(tenant).get(name, fresh=True)
        self._voices[(tenant, name)] = (now, record)
        return record

    def _engine_voice(self, record: Voice) -> EngineVoice:
        if record.embedding is not None:
            return _embedding_voice(record.embedding)
        assert record.recording is not None
        digest = record.digest
        ref = self._references.get(digest)
        if ref is None:
            wav = self.library.recording_audio(record)
            codes = self.engine.reference_codes(wav)
            ref = Reference(digest, self.normalize(record.recording.transcript), codes)
            if len(self._references) >= _MAX_REFERENCES:
                self._references.pop(next(iter(self._references)))
            self._references[digest] = ref
            log.info("voice %s v%d: %d reference codes from its %.1f s recording (%s)", record.name,
                     record.version, codes.shape[0], record.recording.duration_s,
                     "shared" if record.tenant is None else f"tenant {record.tenant}")
        return ref


def _embedding_voice(e: Embedding) -> EngineVoice:
    if e.seed is not None:
        return e.seed
    if e.speaker is not None:
        return e.speaker
    assert e.mix is not None
    return Blend(tuple((_embedding_voice(p.voice), float(p.weight)) for p in e.mix))
