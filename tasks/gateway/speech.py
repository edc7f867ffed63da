"""OpenAI's `POST /v1/audio/speech` request, mapped onto ttspool jobs.

- `model`: "chattts" and OpenAI's speech model names all mean the pool.
- `voice`: a name of the voice library as the key's tenant sees it (tasks/voices.py: its
  own voices, then the shared ones, then the built-ins, OpenAI's voice names, in any
  letter case); a number is a seed; anything else a ChatTTS speaker string.
- `speed`: OpenAI's 0.25-4.0 is a rate factor; ChatTTS has ten speed prompts, each
  about 10 % apart (speed 5 = 1.0), so the factor is mapped to the nearest one and
  clamped: 0.5 and below are [speed_0], 1.4 and above [speed_9].
- `input` longer than one job is split at sentence ends, like a book.
- `stream_format`: "audio" streams the audio itself, "sse" the same bytes as OpenAI's
  server-sent events (`speech.audio.delta` with base64 audio, then `speech.audio.done`).
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..schema import NAME
from ..text.lengths import STEPS_PER_SECOND
from ..text.segments import split_text
from ..voices import OPENAI_VOICES

MAX_INPUT_CHARS = 4096  # OpenAI's limit
MODELS = frozenset({"chattts", "tts-1", "tts-1-hd", "gpt-4o-mini-tts"})
ResponseFormat = Literal["wav", "mp3", "opus", "aac", "flac", "pcm"]
# Formats whose segments can be sent one after another as they are made.
STREAMABLE = frozenset({"wav", "pcm", "mp3", "aac", "opus"})


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    input: Annotated[StrictStr, Field(min_length=1, max_length=MAX_INPUT_CHARS)]
    voice: Union[StrictStr, StrictInt] = "alloy"
    response_format: ResponseFormat = "mp3"
    speed: Annotated[Union[StrictFloat, StrictInt], Field(ge=0.25, le=4.0)] = 1.0
    stream: StrictBool = False
    stream_format: Literal["audio", "sse"] | None = None
    instructions: StrictStr | None = None  # OpenAI's style prompt: accepted, not used by ChatTTS
    # ttspool's own fields.
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None
    temperature: Union[StrictFloat, StrictInt] | None = None
    top_p: Union[StrictFloat, StrictInt] | None = None
    top_k: StrictInt | None = None
    priority: Literal["realtime", "bulk"] = "realtime"
    lang: Literal["auto", "en", "zh"] | None = None


class VoiceRequest(BaseModel):
    """POST /v1/voices: exactly one of seed, speaker, mix or audio (with transcript)."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None
    speaker: StrictStr | None = None
    mix: StrictStr | None = None
    audio: StrictStr | None = None  # the recording file, base64
    transcript: StrictStr | None = None
    description: StrictStr = ""
    replace: StrictBool = False


def chattts_speed(factor: float) -> int:
    return max(0, min(9, round(5 + (factor - 1.0) * 10)))


def voice_of(voice: str | int) -> int | str:
    """The job's voice; a library name is looked up in the job's tenant's space when the
    jobs are submitted, and an unknown one refused there."""
    if isinstance(voice, int):
        return voice
    name = voice.strip()
    if name.lower() in OPENAI_VOICES:
        return name.lower()
    if name.isdigit():
        return int(name)
    if not NAME.fullmatch(name) and len(name) < 32:
        raise ValueError(f"unknown voice {name[:40]!r}: use a voice name (GET /v1/voices), "
                         "an integer seed, or a ChatTTS speaker string")
    return name


# A streamed request's first segment is at most this long, so its audio comes early.
FIRST_SEGMENT_S = 6.0


def segment_jobs(req: SpeechRequest, tenant: str | None, segment_format: str,
                 short_first: bool = False) -> list[dict[str, Any]]:
    """One job per segment of the input; raises ValueError for a bad model or voice.
    `short_first`: the first segment is cut at the first sentence end within
    FIRST_SEGMENT_S, the rest as usual."""
    if req.model not in MODELS:
        raise ValueError(f"unknown model {req.model[:40]!r}: use one of {', '.join(sorted(MODELS))}")
    speed = chattts_speed(float(req.speed))
    common: dict[str, Any] = {"voice": voice_of(req.voice), "speed": speed, "priority": req.priority,
                              "format": segment_format}
    for name in ("seed", "temperature", "top_p", "top_k", "lang"):
        value = getattr(req, name)
        if value is not None:
            common[name] = value
    if tenant is not None:
        common["tenant"] = tenant
    start, texts = 0, []
    if short_first:
        head = split_text(req.input, speed=speed, max_steps=round(FIRST_SEGMENT_S * STEPS_PER_SECOND))
        if len(head) > 1:
            texts, start = [head[0].text], head[0].end
    texts += [s.text for s in split_text(req.input[start:], speed=speed)]
    texts = texts or [req.input]
    return [{**common, "text": t} for t in texts]


def wav_stream_header(sample_rate: int) -> bytes:
    """A WAV header for PCM16 mono of unknown length, as streamed WAVs carry (OpenAI's
    too): the sizes are the largest values, which players read as "until the end"."""
    byte_rate = sample_rate * 2
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1,
            sample_rate, byte_rate, 2, 16) + b"data" + struct.pack("<I", 0xFFFFFFFF))


def sse_delta(audio: bytes) -> bytes:
    return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode()})


def sse_done(input_chars: int, audio_s: float) -> bytes:
    """OpenAI's last event, with its `usage`. ChatTTS' tokenizer runs on the worker, so the
    input is counted in characters; the output in GPT steps (4 audio codes each), which
    the audio's length gives (512 samples each)."""
    steps = round(audio_s * STEPS_PER_SECOND)
    return _sse({"type": "speech.audio.done",
                 "usage": {"input_tokens": input_chars, "output_tokens": steps, "total_tokens": input_chars + steps}})


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
