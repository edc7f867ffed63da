"""Output formats (tasks/audio.py): every format encodes, decodes back to the same
sound at the right rate and length, and the telephony ones are really 8 kHz G.711."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf

from tasks.schema import AUDIO_FORMATS, JobValidationError, parse_job
from tasks.audio import FORMATS, duration_of, encode

SR = 24_000
# Codec delay and padding: MP3 and AAC frames, Opus pre-skip. Generous, but far below
# a wrong rate (x3) or a lost second.
_SLACK_S = {"mp3": 0.08, "aac": 0.1, "opus": 0.03}


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0, SR
    if fmt == "aac":
        with av.open(io.BytesIO(data), format="adts") as src:
            frames = [f.to_ndarray().reshape(-1) for f in src.decode(audio=0)]
            return np.concatenate(frames).astype(np.float32), src.streams.audio[0].rate
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    return audio, rate


def _tone(seconds: float = 2.0, hz: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _peak_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_every_format_round_trips(fmt: str) -> None:
    tone = _tone()
    data, rate, seconds = encode(tone, SR, fmt)
    assert rate == (8000 if fmt.endswith("-8k") else SR) and seconds == pytest.approx(2.0, abs=1e-3)
    audio, got_rate = decode(data, fmt)
    assert got_rate == rate
    assert abs(len(audio) / rate - 2.0) <= _SLACK_S.get(fmt, 1e-3)
    assert abs(_peak_hz(audio, rate) - 440.0) < 5.0
    assert duration_of(data, fmt)[1] == rate
    assert abs(duration_of(data, fmt)[0] - 2.0) <= _SLACK_S.get(fmt, 1e-3)


def test_lossless_formats_are_exact_and_telephony_is_g711() -> None:
    tone = _tone()
    wav, _ = decode(encode(tone, SR, "wav")[0], "wav")
    for fmt in ("flac", "pcm"):
        assert np.array_equal(decode(encode(tone, SR, fmt)[0], fmt)[0], wav)
    assert sf.info(io.BytesIO(encode(tone, SR, "wav-ulaw-8k")[0])).subtype == "ULAW"
    assert sf.info(io.BytesIO(encode(tone, SR, "wav-alaw-8k")[0])).subtype == "ALAW"
    pcm8, _ = decode(encode(tone, SR, "wav-pcm-8k")[0], "wav-pcm-8k")
    ulaw, _ = decode(encode(tone, SR, "wav-ulaw-8k")[0], "wav-ulaw-8k")
    snr = 10 * np.log10(np.sum(pcm8**2) / np.sum((pcm8 - ulaw) ** 2))
    assert snr > 30  # G.711 u-law's quantization, nothing worse


def test_clipping_not_wrapping() -> None:
    loud = np.full(2400, 1.7, dtype=np.float32)
    for fmt in ("wav", "pcm"):
        audio, _ = decode(encode(loud, SR, fmt)[0], fmt)
        assert audio.min() > 0.99
    # Resampling rings at the edges of a step, but nothing wraps around to negative.
    assert decode(encode(loud, SR, "wav-pcm-8k")[0], "wav-pcm-8k")[0].min() > 0.5


def test_job_format_field() -> None:
    assert parse_job({"text": "hi", "format": "wav-ulaw-8k"}).format == "wav-ulaw-8k"
    assert "format" not in parse_job({"text": "hi"}).task_kwargs()
    assert parse_job({"text": "hi", "format": "mp3"}).sampling_params()["format"] == "mp3"
    assert "format" not in parse_job({"text": "hi"}).sampling_params()
    with pytest.raises(JobValidationError, match="format"):
        parse_job({"text": "hi", "format": "wma"})
    assert set(FORMATS) == set(AUDIO_FORMATS)
