"""Voice names -> what the engine needs, at batch time (tasks/voices.py has the library).

A worker reads a named voice from the object store (the truth; the Redis index only
serves producers) and keeps it for `ttl_s`, so a voice added or replaced anywhere is
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
    label: dict[str, Any] | None = None  # {"name", "version"} of a library voice, for results


class VoiceResolver:
    def __init__(self, library: VoiceLibrary, engine: Engine, normalize: Callable[[str], str],
                 ttl_s: float = 5.0) -> None:
        self.library = library
        self.engine = engine
        self.normalize = normalize  # a transcript is read like a job's text
        self.ttl_s = ttl_s
        # One batch function call at a time (celery-batches): no locking needed.
        self._voices: dict[str, tuple[float, Voice | None]] = {}
        self._references: dict[str, Reference] = {}

    def resolve(self, voice: int | str, name: str | None) -> Resolved:
        """Raises JobFailed (reason "voice") for a name that is not in the library or a
        voice the model cannot use."""
        try:
            if name is None:
                self.engine.speaker(voice)  # a speaker string of the wrong size fails here
                return Resolved(voice, voice)
            record = self._lookup(name)
            if record is None:
                raise JobFailed(f"voice {name!r} is not in the voice library (removed after the job was sent?)",
                                reason="voice")
            engine_voice = self._engine_voice(record)
            self.engine.speaker(engine_voice)
        except ValueError as err:
            raise JobFailed(str(err), reason="voice") from None
        return Resolved(engine_voice, {"library": record.digest},
                        {"name": record.name, "version": record.version})

    def _lookup(self, name: str) -> Voice | None:
        now = time.monotonic()
        hit = self._voices.get(name)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        record = self.library.get(name, fresh=True)
        self._voices[name] = (now, record)
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
            log.info("voice %s v%d: %d reference codes from its %.1f s recording", record.name, record.version,
                     codes.shape[0], record.recording.duration_s)
        return ref


def _embedding_voice(e: Embedding) -> EngineVoice:
    if e.seed is not None:
        return e.seed
    if e.speaker is not None:
        return e.speaker
    assert e.mix is not None
    return Blend(tuple((_embedding_voice(p.voice), float(p.weight)) for p in e.mix))
