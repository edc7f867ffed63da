"""Waveform -> WAV bytes (24 kHz mono PCM16)."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    # PCM16 wraps around on overflow instead of clipping; clip first.
    pcm = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def wav_duration(data: bytes) -> tuple[float, int]:
    """(seconds, sample rate) of WAV bytes."""
    info = sf.info(io.BytesIO(data))
    return info.frames / info.samplerate, info.samplerate
