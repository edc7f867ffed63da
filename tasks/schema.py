"""The job contract of `ttspool.synthesize`: plain JSON keyword arguments.

Validated twice: by the producer (nothing is enqueued when invalid) and by the worker
(a bad message becomes a FAILURE with the same readable reason). Any Celery client in
any language can produce these messages, so the worker cannot trust the producer.
"""

from __future__ import annotations

import lzma
import re
import unicodedata
from typing import Annotated, Any, Literal, Union

import pybase16384 as b14
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from .errors import UsageError

MAX_TEXT_CHARS = 2000
MAX_VOICE_CHARS = 4096
MAX_STEPS = 2048
# Output formats a job can ask for: the model's 24 kHz audio as WAV (PCM16), FLAC, MP3,
# Ogg Opus, AAC (ADTS) or raw PCM16 (OpenAI's "pcm"), or 8 kHz WAV for telephony
# (G.711 u-law, A-law, or PCM16). tasks/audio.py encodes them.
AUDIO_FORMATS = ("wav", "flac", "mp3", "opus", "aac", "pcm", "wav-ulaw-8k", "wav-alaw-8k", "wav-pcm-8k")
AudioFormatName = Literal["wav", "flac", "mp3", "opus", "aac", "pcm", "wav-ulaw-8k", "wav-alaw-8k", "wav-pcm-8k"]
# A book's formats (tasks/book.py), named as jobs name them. "ogg", a book's name for Ogg
# Vorbis before, is taken as "opus": one name for Ogg audio everywhere.
BOOK_FORMATS = ("wav", "flac", "opus")
BOOK_FORMAT_ALIASES = {"ogg": "opus"}

# SSML-like markup (<speak>, <break time="1s"/>) is stripped rather than refused, so
# pipelines that template their prompts still work; ChatTTS' own [tags] are kept.
_MARKUP = re.compile(r"</?[A-Za-z][^<>]{0,200}>")
# Job ids and voice names: they end up in Redis keys and storage paths.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_TTL_S = 7 * 86400

Seed = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]


class JobValidationError(UsageError):
    """A job that must not run; the message names each offending field."""


class TextTooLong(JobValidationError):
    """A job whose text is over MAX_TEXT_CHARS. The message says no more: the surface it
    reaches names its own way to speak a long text (the CLI `ttspool book`, the gateway
    `/v1/audio/speech`), which splits it into jobs."""


_TOO_LONG = "text_too_long"


def _too_long(length: int) -> PydanticCustomError:
    return PydanticCustomError(_TOO_LONG, f"text is longer than {MAX_TEXT_CHARS} characters ({length})")


def check_speaker(value: str) -> int:
    """Return the dimension of a ChatTTS speaker string (base16384 + raw LZMA of float16)."""
    decoder = lzma.LZMADecompressor(
        format=lzma.FORMAT_RAW,
        filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}],
    )
    try:
        # Bounded: a few KB of input could otherwise expand to many MB (an LZMA bomb).
        raw = decoder.decompress(b14.decode_from_string(value), max_length=2 * 4096 + 2)
    except Exception:
        raise ValueError("not a ChatTTS speaker string (expected base16384 + LZMA data)") from None
    if len(raw) % 2 or not 16 <= len(raw) // 2 <= 4096:
        raise ValueError("speaker string does not hold a float16 embedding vector")
    return len(raw) // 2


class JobSpec(BaseModel):
    # NaN and infinities are refused everywhere: `expires_at: NaN` would compare false
    # against every clock and never expire.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    text: StrictStr
    voice: Union[Seed, Annotated[StrictStr, Field(max_length=MAX_VOICE_CHARS)]] = 2
    seed: Seed = 0
    speed: Annotated[StrictInt, Field(ge=0, le=9)] = 5
    temperature: Annotated[Union[StrictFloat, StrictInt], Field(gt=0, le=2)] = 0.3
    top_p: Annotated[Union[StrictFloat, StrictInt], Field(gt=0, le=1)] = 0.7
    top_k: Annotated[StrictInt, Field(ge=1, le=625)] = 20
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_STEPS)] = MAX_STEPS
    priority: Literal["realtime", "bulk"] = "bulk"
    job_id: StrictStr | None = None
    # Set by producers that know it (the Python API does); used for queue-wait metrics
    # and as the start of `ttl_s`.
    enqueued_at: Union[StrictFloat, StrictInt, None] = None
    # Deadline (Unix seconds), or a time-to-live counted from enqueued_at: a job past
    # it fails fast as EXPIRED instead of taking a GPU slot nobody waits for any more.
    expires_at: Union[StrictFloat, StrictInt, None] = None
    ttl_s: Annotated[Union[StrictFloat, StrictInt, None], Field(gt=0, le=MAX_TTL_S)] = None
    # Who submitted the job: the key of per-tenant rate limits.
    tenant: StrictStr | None = None
    # The text front-end (tasks/text/frontend.py): the language numbers and symbols are
    # read in (auto: decided span by span), and whether to read them at all (false: the
    # producer normalized the text already; only ChatTTS' character rules apply).
    lang: Literal["auto", "en", "zh"] = "auto"
    normalize: StrictBool = True
    format: AudioFormatName = "wav"

    @field_validator("text")
    @classmethod
    def _clean_text(cls, v: str) -> str:
        if len(v) > MAX_TEXT_CHARS * 2:
            raise _too_long(len(v))
        # Until nothing changes: removing inner markup can join outer markup ("<a<b>>"), and
        # the worker, validating again, must read the same text the producer sent.
        while (stripped := _MARKUP.sub(" ", v)) != v:
            v = stripped
        bad = sorted({f"U+{ord(c):04X}" for c in v if unicodedata.category(c) in ("Cc", "Cs", "Co") and c not in "\n\r\t"})
        if bad:
            raise ValueError(f"text contains control characters ({', '.join(bad[:5])})")
        v = " ".join(v.split())
        if not v:
            raise ValueError("text is empty")
        if len(v) > MAX_TEXT_CHARS:
            raise _too_long(len(v))
        return v

    @field_validator("voice")
    @classmethod
    def _check_voice(cls, v: int | str) -> int | str:
        if isinstance(v, str):
            if v.strip().isdigit():
                raise ValueError("voice seeds must be JSON integers, not strings")
            # A name of the voice library (tasks/voices.py) or a speaker string: the two
            # cannot be confused, since base16384 text has no ASCII letters or digits.
            if not NAME.fullmatch(v):
                check_speaker(v)
        return v

    @property
    def voice_name(self) -> str | None:
        """The voice library name the job asks for, if it names one."""
        return self.voice if isinstance(self.voice, str) and NAME.fullmatch(self.voice) else None

    @field_validator("job_id", "tenant")
    @classmethod
    def _check_name(cls, v: str | None, info: ValidationInfo) -> str | None:
        # Both end up in Redis keys and storage paths: a safe charset, bounded length.
        pattern, limit = (NAME, 128) if info.field_name == "job_id" else (TENANT, 64)
        if v is not None and not pattern.fullmatch(v):
            raise ValueError(
                f"{info.field_name} must be 1-{limit} characters of letters, digits, '.', '_' "
                "or '-', starting with a letter or digit"
            )
        return v

    def deadline(self) -> float | None:
        """The earliest of expires_at and enqueued_at + ttl_s, or None if neither is set."""
        ends = [float(self.expires_at)] if self.expires_at is not None else []
        if self.ttl_s is not None and self.enqueued_at is not None:
            ends.append(float(self.enqueued_at) + float(self.ttl_s))
        return min(ends) if ends else None

    def task_kwargs(self) -> dict[str, Any]:
        data = self.model_dump(exclude_none=True)
        # Left out at their defaults, so a worker from before the front-end still takes
        # the message during a rolling upgrade.
        for name in _SINCE_FRONT_END:
            if data[name] == type(self).model_fields[name].default:
                del data[name]
        return data

    def sampling_params(self) -> dict[str, Any]:
        """The fields that shape the audio besides the text (for content keys)."""
        return {
            "voice": self.voice,
            "seed": self.seed,
            "speed": self.speed,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
            # Only when not WAV, so the keys of WAV outputs stored before formats existed hold.
            **({"format": self.format} if self.format != "wav" else {}),
        }


_SINCE_FRONT_END = ("lang", "normalize", "format")


def _describe(err: ValidationError) -> str:
    # Union members report the same field once per member; keep one reason per field.
    reasons: dict[str, str] = {}
    for e in err.errors():
        # Unknown field names come from the sender: keep them one short printable line.
        field = ascii(str(e["loc"][0]))[1:-1][:40] if e["loc"] else "job"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif field == "voice" and e["type"] in ("int_type", "string_type"):
            msg = "must be an integer seed, a voice name or a ChatTTS speaker string"
        reasons.setdefault(field, f"{field}: {msg}")
    parts = list(reasons.values())
    if len(parts) > 12:  # a message with thousands of unknown fields gets a bounded reason
        parts = parts[:12] + [f"and {len(parts) - 12} more fields"]
    return "; ".join(parts)


def parse_job(data: Any) -> JobSpec:
    """Validate a job from untrusted JSON-like data; raises JobValidationError only."""
    if isinstance(data, JobSpec):
        return data
    if not isinstance(data, dict):
        raise JobValidationError(f"job must be a JSON object, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        kind = TextTooLong if any(e["type"] == _TOO_LONG for e in err.errors()) else JobValidationError
        raise kind(f"invalid job: {_describe(err)}") from None
    except (TypeError, ValueError, RecursionError) as err:
        raise JobValidationError(f"invalid job: {err}") from None
