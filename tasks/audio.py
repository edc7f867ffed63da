"""Waveform -> the bytes of a job's output format, and the duration of stored bytes.

Torch-free, for the worker (each job's output) and the HTTP gateway (long input
assembled from its segments); producers that only submit never import it. Encoders
are libraries: libsndfile through soundfile (WAV, FLAC, MP3 via LAME, Ogg
Opus, G.711 u-law and A-law), FFmpeg's AAC through PyAV, and soxr for the 8 kHz
telephony formats' resampling.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np
import soundfile as sf

from .schema import AUDIO_FORMATS

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
        # One quantization for every format: libsndfile's own float conversion differs
        # by one step between WAV and FLAC, and lossless must mean the same samples.
        pcm16 = np.round(pcm * 32767.0).astype(np.int16)
        buf = io.BytesIO()
        # Little-endian for RAW (OpenAI's "pcm": headerless 16-bit LE mono); the other
        # containers fix their own byte order.
        sf.write(buf, pcm16, rate, format=container, subtype=subtype, endian="LITTLE" if container == "RAW" else "FILE")
        return buf.getvalue()
    return encode


def _aac(pcm: np.ndarray, rate: int) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="adts") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        stream.bit_rate = 64_000
        frame_size = 1024
        for start in range(0, len(pcm), frame_size):
            chunk = pcm[start:start + frame_size].reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


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
    info = sf.info(io.BytesIO(data))
    return info.frames / info.samplerate, info.samplerate


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Any common audio file -> (float32 mono samples, their rate); channels are averaged.
    libsndfile reads WAV, FLAC, Ogg and MP3; PyAV (FFmpeg) the rest (M4A, AAC, WebM...).
    Raises ValueError when neither can read it."""
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
