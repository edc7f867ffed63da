"""The voice library: named, durable, versioned voices (docs/VOICES.md).

A voice is one of:
- `seed`: the speaker a seed draws (the same as `voice: <seed>` in a job);
- `speaker`: a ChatTTS speaker string (a 768-d embedding);
- `mix`: a weighted blend of embedding voices, as they were when it was made;
- `recording`: a short reference recording with its transcript; the worker's DVAE turns
  it into audio codes that go into the row's prompt (ChatTTS' `spk_smp` + `txt_smp`).

Voices live in spaces: the shared space (the operator's; every tenant uses it, none
changes it) and one space per tenant (an API key's tenant, a job's `tenant`), which only
that tenant sees. A name is resolved in the tenant's space first, then the shared one,
then among the built-ins, OpenAI's voice names (seed voices of version 0, read-only). An
operator replaces a built-in for everyone in the shared space; a tenant may put its own
voice of a shared or built-in name in its own space (with `replace`), for its own jobs.

The object store is the truth. The shared space keeps the layout of the time before
spaces: `voices/<name>.json` holds the current version's record, `voices/<name>/v<N>.wav`
a recording (24 kHz mono PCM16, checked on the way in). A tenant's space is the same
under `tenants/<tenant>/voices/`: outside `voices/`, so no voice's recording folder can
be mistaken for it. Redis holds one index per space (`ttspool:voices`, and
`ttspool:tenant-voices:<tenant>`: name -> record) that producers check names against; a
deployment may flush them, and reads from the store refill them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, Union

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, model_validator

from .errors import UsageError
from .schema import NAME, TENANT, Seed, check_speaker

PREFIX = "voices/"  # the shared space's
INDEX_KEY = "ttspool:voices"  # the shared space's
TENANT_PREFIX = "tenants/"
TENANT_INDEX_PREFIX = "ttspool:tenant-voices:"
# A field no voice name can be: the index it is in lists every voice of its space, so a
# name it lacks is not there (OpenAI's names, asked for with most gateway requests, would
# otherwise cost every request a read of a missing object in each space).
_COMPLETE = "."
_SPACE_WORDS = {"tenant": "tenant's", "shared": "shared", "builtin": "built-in"}
SAMPLE_RATE = 24_000
# A reference recording long enough to carry a voice and short enough that its codes
# (46.875 per second) stay a modest share of a row's prompt and KV cache.
MIN_RECORDING_S = 1.0
MAX_RECORDING_S = 15.0
MAX_RECORDING_BYTES = 16 << 20
MAX_TRANSCRIPT_CHARS = 300
MAX_DESCRIPTION_CHARS = 500
MAX_MIX_PARTS = 8
# OpenAI's speech voice names, as fixed seeds chosen once and kept (the gateway maps
# OpenAI requests onto these names).
OPENAI_VOICES: dict[str, int] = {
    "alloy": 1111, "ash": 2222, "ballad": 3333, "coral": 4444, "echo": 5555, "fable": 6666, "nova": 7777,
    "onyx": 8888, "sage": 9999, "shimmer": 1234, "verse": 2345, "marin": 3456, "cedar": 4567,
}

Kind = Literal["seed", "speaker", "mix", "recording"]


@dataclass(frozen=True)
class VoiceFix:
    """What the caller can do about a VoiceError: add the voice, or add it again with
    replace; `tenant`: in whose space. The library's messages name no command or route:
    the surface the error reaches (the CLI, the gateway) says how, in its own words."""

    action: Literal["add", "replace"]
    name: str
    tenant: str | None


class VoiceError(UsageError):
    """A voice operation the caller must change: bad input, an unknown or taken name."""

    def __init__(self, message: str, fix: VoiceFix | None = None) -> None:
        super().__init__(message)
        self.fix = fix


class VoiceNotFound(VoiceError):
    pass


class VoiceReadOnly(VoiceError):
    """A change to a voice the caller may use but not change: a shared voice seen from a
    tenant's space, or a built-in."""


class Embedding(BaseModel):
    """What a speaker embedding is made from: exactly one of seed, speaker, mix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: Seed | None = None
    speaker: StrictStr | None = None
    mix: tuple["MixPart", ...] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "Embedding":
        if sum(x is not None for x in (self.seed, self.speaker, self.mix)) != 1:
            raise ValueError("an embedding is made from exactly one of seed, speaker, mix")
        return self


class MixPart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: Annotated[Union[StrictFloat, StrictInt], Field(gt=0, le=1000)]
    source: StrictStr  # "name@version" the part was taken from, for people reading it
    voice: Embedding


class Recording(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: StrictStr  # the 24 kHz mono WAV in the store
    sha256: StrictStr
    transcript: StrictStr
    duration_s: StrictFloat


class Voice(BaseModel):
    """One version of a named voice: the record stored at voices/<name>.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr
    version: StrictInt
    kind: Kind
    embedding: Embedding | None = None
    recording: Recording | None = None
    description: StrictStr = ""
    created_at: StrictFloat | StrictInt = 0
    builtin: bool = False
    tenant: StrictStr | None = None  # the space the voice is in; None: shared (or built-in)

    @property
    def space(self) -> Literal["tenant", "shared", "builtin"]:
        return "builtin" if self.builtin else "shared" if self.tenant is None else "tenant"

    @property
    def label(self) -> dict[str, Any]:
        """What a job's result says of the voice it was made with."""
        return {"name": self.name, "version": self.version, "space": self.space,
                **({"tenant": self.tenant} if self.tenant is not None else {})}

    @property
    def digest(self) -> str:
        """sha256 of what makes the sound (not the name, version or description): the
        content key's voice, so a replaced voice never serves audio made with the old one."""
        what = self.model_dump(include={"kind", "embedding", "recording"}, exclude_none=True)
        if "recording" in what:
            what["recording"] = {k: what["recording"][k] for k in ("sha256", "transcript")}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """The record as `voice list --json` and the gateway show it (a speaker string is
        long: shown by `export`, not here)."""
        out: dict[str, Any] = {"name": self.name, "version": self.version, "kind": self.kind,
                               "description": self.description, "builtin": self.builtin,
                               "created_at": self.created_at, "digest": self.digest, "space": self.space}
        if self.tenant is not None:
            out["tenant"] = self.tenant
        if self.embedding is not None and self.embedding.seed is not None:
            out["seed"] = self.embedding.seed
        if self.embedding is not None and self.embedding.mix is not None:
            out["mix"] = [{"source": p.source, "weight": p.weight} for p in self.embedding.mix]
        if self.recording is not None:
            out["transcript"] = self.recording.transcript
            out["duration_s"] = self.recording.duration_s
        return out


Embedding.model_rebuild()  # MixPart, which Embedding names, is defined after it


def fix_of(err: BaseException) -> VoiceFix | None:
    """The fix of a VoiceError, or of the one `err` was raised from (a job that names an
    unknown voice is a JobValidationError raised from its VoiceNotFound)."""
    for cause in (err, err.__cause__):
        if isinstance(cause, VoiceError) and cause.fix is not None:
            return cause.fix
    return None


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or name.isdigit():
        raise VoiceError(
            f"voice name {str(name)[:40]!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and not all digits (those are seeds)"
        )
    return name


def check_tenant(tenant: Any) -> str:
    if not isinstance(tenant, str) or not TENANT.fullmatch(tenant):
        raise VoiceError(f"tenant {str(tenant)[:40]!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return tenant


def builtin(name: str) -> Voice | None:
    seed = OPENAI_VOICES.get(name)
    if seed is None:
        return None
    return Voice(name=name, version=0, kind="seed", embedding=Embedding(seed=seed), builtin=True,
                 description="OpenAI voice name; a fixed ChatTTS seed")


class Store(Protocol):
    """What the library needs of an object store (storage.Storage, handed in)."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list_keys(self, prefix: str) -> list[str]: ...


class Index(Protocol):
    """The Redis calls the index needs (a redis.Redis)."""

    def hget(self, name: str, key: str) -> Any: ...
    def hset(self, name: str, key: str, value: str) -> Any: ...
    def hdel(self, name: str, *keys: Any) -> Any: ...
    def hexists(self, name: str, key: str) -> Any: ...


class VoiceLibrary:
    """Voices in the object store, indexed in Redis, as one space sees them: a tenant's
    (its own voices, then the shared ones, then the built-ins) or, with no tenant, the
    shared space (the operator's: the CLI, a gateway admin key, a job without a tenant).
    Changes go to that space only. Without a store (a producer that has no storage
    credentials) names are checked against the indexes and the built-ins only."""

    def __init__(self, store: Store | None, index: Index | None, tenant: str | None = None) -> None:
        self.store = store
        self.index = index
        self.tenant = None if tenant is None else check_tenant(tenant)

    def scoped(self, tenant: str | None) -> "VoiceLibrary":
        """This library as `tenant`'s space sees it (None: the shared space)."""
        return self if tenant == self.tenant else VoiceLibrary(self.store, self.index, tenant)

    def _spaces(self) -> list[str | None]:
        """Where a name is looked for, first to last (the built-ins come after them)."""
        return [None] if self.tenant is None else [self.tenant, None]

    # -- reading ------------------------------------------------------------------

    def get(self, name: str, fresh: bool = False) -> Voice | None:
        """The voice the name stands for in this space, or None. `fresh` reads the store,
        not the indexes."""
        check_name(name)
        for space in self._spaces():
            voice = self._get_in(space, name, fresh)
            if voice is not None:
                return voice
        return builtin(name)

    def require(self, name: str, fresh: bool = False) -> Voice:
        voice = self.get(name, fresh)
        if voice is None:
            raise VoiceNotFound(f"unknown voice {name!r}: add it to the voice library first",
                                VoiceFix("add", name, self.tenant))
        return voice

    def list(self) -> list[Voice]:
        """Every voice this space sees, each as its name resolves here (a tenant's own in
        place of a shared or built-in voice of its name), read from the store; the indexes
        are refilled from it."""
        voices = {n: v for n in OPENAI_VOICES if (v := builtin(n)) is not None}
        for space in reversed(self._spaces()):
            voices.update(self._reindex(space))
        return sorted(voices.values(), key=lambda v: v.name)

    def reindex(self) -> int:
        """Refill the index of every space, the shared one and each tenant's, from the
        store (a worker does it when it starts: producers without a store then know every
        voice again after Redis was flushed); returns how many voices there are."""
        tenants = {parts[1] for k in self._store().list_keys(TENANT_PREFIX)
                   if len(parts := k.split("/")) > 3 and parts[2] == "voices"}
        return sum(len(self._reindex(t)) for t in [None, *sorted(tenants)])

    def recording_audio(self, voice: Voice) -> bytes:
        if voice.recording is None:
            raise VoiceError(f"voice {voice.name!r} is not a recording")
        return self._store().get_bytes(voice.recording.key)

    # -- writing ------------------------------------------------------------------

    def add(self, name: str, *, seed: int | None = None, speaker: str | None = None,
            recording: bytes | None = None, transcript: str | None = None, mix: str | None = None,
            description: str = "", replace: bool = False) -> Voice:
        """Add a voice to this space, or with `replace` its next version. Exactly one of
        seed, speaker, recording (with transcript) or mix ("name:weight,name:weight"). In a
        tenant's space, `replace` also puts the tenant's own voice in place of a shared or
        built-in one of that name, for that tenant's jobs only."""
        check_name(name)
        given = [x for x in (seed, speaker, recording, mix) if x is not None]
        if len(given) != 1:
            raise VoiceError("a voice is made from exactly one of a seed, a speaker string, a recording "
                             "(with its transcript) or a mix")
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise VoiceError(f"description is longer than {MAX_DESCRIPTION_CHARS} characters")
        if transcript is not None and recording is None:
            raise VoiceError("a transcript goes with a recording")
        store = self._store()
        space = self.tenant
        current = self._read(space, name)
        seen = current or self._beneath(name)
        if seen is not None and not replace:
            fix = VoiceFix("replace", name, space)
            if current is None and space is not None:
                raise VoiceError(f"voice {name!r} exists as a {_SPACE_WORDS[seen.space]} voice (version {seen.version}); "
                                 "replace it to put a voice of this tenant's own in its place, for this tenant's "
                                 "jobs only", fix)
            raise VoiceError(f"voice {name!r} exists (version {seen.version}); replace it to make a new version", fix)
        # Versions count per space: a tenant's first voice of a shared name is its version 1.
        version = current.version + 1 if current is not None else 1
        fields: dict[str, Any] = {}
        if seed is not None:
            fields = {"kind": "seed", "embedding": _embedding({"seed": seed})}
        elif speaker is not None:
            try:
                check_speaker(speaker)
            except ValueError as err:
                raise VoiceError(f"speaker: {err}") from None
            fields = {"kind": "speaker", "embedding": Embedding(speaker=speaker)}
        elif mix is not None:
            fields = {"kind": "mix", "embedding": Embedding(mix=self._mix_parts(name, mix))}
        elif recording is not None:
            wav, seconds = prepare_recording(recording)
            text = check_transcript(transcript)
            key = f"{_prefix(space)}{name}/v{version}.wav"
            store.put_bytes(key, wav, "audio/wav")
            fields = {"kind": "recording", "recording": Recording(
                key=key, sha256=hashlib.sha256(wav).hexdigest(), transcript=text, duration_s=round(seconds, 3))}
        voice = Voice(name=name, version=version, description=description, created_at=round(time.time(), 3),
                      tenant=space, **fields)
        store.put_bytes(_record_key(space, name), voice.model_dump_json(indent=1).encode(), "application/json")
        if self.index is not None:
            self.index.hset(_index_key(space), name, voice.model_dump_json())
        return voice

    def remove(self, name: str) -> Voice:
        """Remove a voice of this space and its recordings: what the name stood for
        beneath it (a shared or built-in voice) comes back."""
        store = self._store()
        space = self.tenant
        voice = self._read(space, name)
        if voice is None:
            seen = self._beneath(name)
            if seen is None:
                raise VoiceNotFound(f"unknown voice {name!r}")
            fix = VoiceFix("replace", name, space)
            if seen.builtin and space is None:
                raise VoiceReadOnly(f"{name!r} is a built-in voice: replace it instead of removing it", fix)
            raise VoiceReadOnly(f"{name!r} is a {_SPACE_WORDS[seen.space]} voice: only the operator changes it; a tenant "
                                "may replace it with a voice of its own of that name", fix)
        store.delete(_record_key(space, name))
        if self.index is not None:
            self.index.hdel(_index_key(space), name)
        for key in store.list_keys(f"{_prefix(space)}{name}/"):
            store.delete(key)
        return voice

    # -- internals ----------------------------------------------------------------

    def _store(self) -> Store:
        if self.store is None:
            raise VoiceError("the voice library needs the object store (TTSPOOL_STORAGE_URL)")
        return self.store

    def _beneath(self, name: str) -> Voice | None:
        """What the name stands for below this space: the shared voice or the built-in
        under a tenant's space, the built-in under the shared one."""
        return builtin(name) if self.tenant is None else self.scoped(None).get(name, fresh=True)

    def _get_in(self, space: str | None, name: str, fresh: bool) -> Voice | None:
        key = _index_key(space)
        if not fresh and self.index is not None:
            raw = self.index.hget(key, name)
            if raw is not None:
                voice = _parse(raw, f"index entry {name}")
                # Indexes from before spaces held unreplaced built-ins too: those come last.
                return None if voice.builtin else voice
            if self.store is None or self.index.hexists(key, _COMPLETE):
                return None
            return self._reindex(space).get(name)
        if self.store is None:
            return None
        voice = self._read(space, name)
        if self.index is not None:
            if voice is not None:
                self.index.hset(key, name, voice.model_dump_json())
            else:
                self.index.hdel(key, name)
        return voice

    def _reindex(self, space: str | None) -> dict[str, Voice]:
        """The space's voices from the store, written to its index, which is then complete.
        Entries are only added: one removed in between stays until a fresh read drops it,
        rather than a voice added in between being dropped from a complete index."""
        prefix = _prefix(space)
        names = [rest[:-5] for k in self._store().list_keys(prefix)
                 if (rest := k[len(prefix):]).endswith(".json") and "/" not in rest]
        found = {v.name: v for v in (self._read(space, n) for n in names) if v is not None}
        if self.index is not None:
            key = _index_key(space)
            for name, voice in found.items():
                self.index.hset(key, name, voice.model_dump_json())
            self.index.hset(key, _COMPLETE, "1")
        return found

    def _read(self, space: str | None, name: str) -> Voice | None:
        store = self._store()
        key = _record_key(space, name)
        if not store.exists(key):
            return None
        voice = _parse(store.get_bytes(key), key)
        if voice.name != name or voice.tenant != space:
            raise VoiceError(f"{key} holds voice {voice.name!r} of {voice.tenant or 'the shared space'}, not {name!r}")
        return voice

    def _mix_parts(self, name: str, spec: str) -> tuple[MixPart, ...]:
        parts: list[MixPart] = []
        items = [p.strip() for p in spec.split(",") if p.strip()]
        if not 2 <= len(items) <= MAX_MIX_PARTS:
            raise VoiceError(f"a mix names 2-{MAX_MIX_PARTS} voices as name:weight,name:weight")
        for item in items:
            part, _, raw_weight = item.rpartition(":")
            if not part:
                part, raw_weight = raw_weight, "1"
            try:
                weight = float(raw_weight)
            except ValueError:
                raise VoiceError(f"mix weight {raw_weight[:20]!r} of {part[:40]!r} is not a number") from None
            if not 0 < weight <= 1000:
                raise VoiceError(f"mix weight of {part[:40]!r} must be above 0 (and at most 1000), got {weight}")
            if part == name:
                raise VoiceError("a mix cannot contain the voice it replaces")
            source = self.require(check_name(part))
            if source.embedding is None:
                raise VoiceError(f"voice {part!r} is a recording: only seed, speaker and mix voices can be mixed")
            parts.append(MixPart(weight=weight, source=f"{part}@{source.version}", voice=source.embedding))
        return tuple(parts)


def _prefix(space: str | None) -> str:
    return PREFIX if space is None else f"{TENANT_PREFIX}{space}/voices/"


def _index_key(space: str | None) -> str:
    return INDEX_KEY if space is None else f"{TENANT_INDEX_PREFIX}{space}"


def _record_key(space: str | None, name: str) -> str:
    return f"{_prefix(space)}{name}.json"


def _embedding(data: dict[str, Any]) -> Embedding:
    try:
        return Embedding.model_validate(data)
    except ValidationError as err:
        raise VoiceError(f"invalid voice: {err.errors()[0]['msg']}") from None


def _parse(raw: bytes | str, where: str) -> Voice:
    try:
        return Voice.model_validate_json(raw)
    except ValidationError:
        raise VoiceError(f"{where} is not a valid voice record") from None


def check_transcript(text: str | None) -> str:
    text = " ".join((text or "").split())
    if not text:
        raise VoiceError("a recording needs its transcript (what is said in it)")
    if len(text) > MAX_TRANSCRIPT_CHARS:
        raise VoiceError(f"transcript is longer than {MAX_TRANSCRIPT_CHARS} characters")
    return text


def prepare_recording(data: bytes) -> tuple[bytes, float]:
    """A reference recording as the model hears it: mono, 24 kHz, PCM16 WAV. Raises
    VoiceError for what cannot carry a voice (unreadable, too short or long, silent)."""
    import numpy as np

    from .audio import decode, encode

    if len(data) > MAX_RECORDING_BYTES:
        raise VoiceError(f"recording is over {MAX_RECORDING_BYTES >> 20} MiB")
    try:
        pcm, rate = decode(data)
    except ValueError as err:
        raise VoiceError(f"recording: {err}") from None
    seconds = len(pcm) / rate if rate else 0.0
    if not MIN_RECORDING_S <= seconds <= MAX_RECORDING_S:
        raise VoiceError(f"recording is {seconds:.1f} s long; a voice needs {MIN_RECORDING_S:.0f}-"
                         f"{MAX_RECORDING_S:.0f} s of speech")
    if not np.isfinite(pcm).all() or float(np.abs(pcm).max()) < 1e-3:
        raise VoiceError("recording is silent (or holds non-finite samples)")
    if rate != SAMPLE_RATE:
        import soxr

        pcm = soxr.resample(pcm, rate, SAMPLE_RATE, quality="HQ")
    wav, _, seconds = encode(pcm, SAMPLE_RATE, "wav")
    return wav, seconds
