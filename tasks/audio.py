"""Waveform -> the bytes of a job's output format, and the duration of stored bytes.

Torch-free, for the worker (each job's output) and the HTTP gateway (long input
assembled from its segments); producers that only submit never import it. Encoders
are libraries: libsndfile through soundfile (WAV, FLAC, MP3 via LAME, Ogg
Opus, G.711 u-law and A-law), FFmpeg's AAC through PyAV, and soxr for the 8 kHz
telephony formats' resampling.

The gateway installs neither numpy nor libsndfile (the `gateway` extra): importing this
module loads neither, and `from_pcm16` makes its files from raw PCM16 with the standard
library (WAV) and PyAV (the compressed formats).
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Callable

from .schema import AUDIO_FORMATS

if TYPE_CHECKING:
    import numpy as np

TELEPHONY_RATE = 8000


@dataclass(frozen=True)
class AudioFormat:
    name: str
    extension: str
    content_type: str
    sample_rate: int | None  # None: the model's own (24 kHz)
    encode: Callable[[np.ndarray, int], bytes]


def _soundfile(container: str, subtype: str) -> Callable[[np.ndarray, int], bytes]:
    def encode(pcm: np.ndarray, rate: int) -> bytes:
        import soundfile as sf

        # One quantization for every format: libsndfile's own float conversion differs
        # by one step between WAV and FLAC, and lossless must mean the same samples.
        pcm16 = _pcm16(pcm)
        buf = io.BytesIO()
        # Little-endian for RAW (OpenAI's "pcm": headerless 16-bit LE mono); the other
        # containers fix their own byte order.
        sf.write(buf, pcm16, rate, format=container, subtype=subtype, endian="LITTLE" if container == "RAW" else "FILE")
        return buf.getvalue()
    return encode


def _pcm16(pcm: np.ndarray) -> np.ndarray:
    import numpy as np

    return np.round(pcm * 32767.0).astype(np.int16)


def _aac(pcm: np.ndarray, rate: int) -> bytes:
    return _ffmpeg(_pcm16(pcm).astype("<i2").tobytes(), rate, "adts", "aac")


# format -> (PyAV container, encoder): FFmpeg's own where it has one, LAME and libopus
# (both in PyAV's wheels) otherwise.
_FFMPEG = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "aac": ("adts", "aac"), "flac": ("flac", "flac")}


def _ffmpeg(pcm: bytes, rate: int, container: str, codec: str) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        if codec == "aac":
            stream.bit_rate = 64_000
        # One frame of all the samples: the encoder converts the sample format and cuts
        # it into the frame size its codec needs.
        frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
        frame.planes[0].update(pcm)
        frame.sample_rate = rate
        frame.pts = 0
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def from_pcm16(pcm: bytes, rate: int, fmt: str) -> bytes:
    """Raw PCM16 (little-endian, mono) -> a file in `fmt` at the same rate, without numpy
    or libsndfile: the gateway joins a long input's segments with it. The telephony
    formats (a resampling) are the worker's alone."""
    if len(pcm) % 2:
        raise ValueError("PCM16 data has an odd number of bytes")
    if fmt == "pcm":
        return pcm
    if fmt == "wav":
        buf = io.BytesIO()
        with wave.open(buf, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(rate)
            out.writeframes(pcm)
        return buf.getvalue()
    if fmt in _FFMPEG:
        return _ffmpeg(pcm, rate, *_FFMPEG[fmt])
    raise ValueError(f"{fmt} cannot be made from PCM16 here: it needs the worker's resampling")


FORMATS: dict[str, AudioFormat] = {f.name: f for f in (
    AudioFormat("wav", "wav", "audio/wav", None, _soundfile("WAV", "PCM_16")),
    AudioFormat("flac", "flac", "audio/flac", None, _soundfile("FLAC", "PCM_16")),
    AudioFormat("mp3", "mp3", "audio/mpeg", None, _soundfile("MP3", "MPEG_LAYER_III")),
    AudioFormat("opus", "opus", "audio/ogg", None, _soundfile("OGG", "OPUS")),
    AudioFormat("aac", "aac", "audio/aac", None, _aac),
    AudioFormat("pcm", "pcm", "audio/pcm", None, _soundfile("RAW", "PCM_16")),
    AudioFormat("wav-ulaw-8k", "wav", "audio/wav", TELEPHONY_RATE, _soundfile("WAV", "ULAW")),
    AudioFormat("wav-alaw-8k", "wav", "audio/wav", TELEPHONY_RATE, _soundfile("WAV", "ALAW")),
    AudioFormat("wav-pcm-8k", "wav", "audio/wav", TELEPHONY_RATE, _soundfile("WAV", "PCM_16")),
)}
assert tuple(FORMATS) == AUDIO_FORMATS, "the job schema and the encoders must name the same formats"


def encode(audio: np.ndarray, sample_rate: int, fmt: str = "wav") -> tuple[bytes, int, float]:
    """(bytes, their sample rate, seconds) of `audio` in format `fmt`."""
    import numpy as np

    spec = FORMATS[fmt]
    # Integer PCM wraps around on overflow instead of clipping; clip first.
    pcm = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    rate = sample_rate
    if spec.sample_rate is not None and spec.sample_rate != sample_rate:
        import soxr

        pcm = np.clip(soxr.resample(pcm, sample_rate, spec.sample_rate, quality="HQ"), -1.0, 1.0)
        rate = spec.sample_rate
    return spec.encode(pcm, rate), rate, len(pcm) / rate


def duration_of(data: bytes, fmt: str = "wav", model_rate: int = 24_000) -> tuple[float, int]:
    """(seconds, sample rate) of stored bytes in format `fmt`."""
    if fmt == "pcm":
        return len(data) / 2 / model_rate, model_rate
    if fmt == "aac":
        import av

        with av.open(io.BytesIO(data), format="adts") as src:
            stream = src.streams.audio[0]
            samples = sum(frame.samples for frame in src.decode(stream))
            return samples / stream.rate, stream.rate
    import soundfile as sf

    info = sf.info(io.BytesIO(data))
    return info.frames / info.samplerate, info.samplerate


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Any common audio file -> (float32 mono samples, their rate); channels are averaged.
    libsndfile reads WAV, FLAC, Ogg and MP3; PyAV (FFmpeg) the rest (M4A, AAC, WebM...).
    Raises ValueError when neither can read it."""
    import numpy as np
    import soundfile as sf

    try:
        pcm, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        import av

        try:
            with av.open(io.BytesIO(data)) as src:
                stream = src.streams.audio[0]
                resampler = av.AudioResampler(format="flt", layout="mono", rate=stream.rate)
                frames = [f.to_ndarray().reshape(-1) for frame in src.decode(stream) for f in resampler.resample(frame)]
                rate = stream.rate
                pcm = np.concatenate(frames or [np.zeros(0, np.float32)])[:, None]
        except (av.FFmpegError, IndexError, ValueError) as err:
            raise ValueError(f"not a readable audio file ({type(err).__name__})") from None
    return np.ascontiguousarray(pcm.mean(axis=1), dtype=np.float32), int(rate)
