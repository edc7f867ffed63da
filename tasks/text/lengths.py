"""Predicted audio length of a text, in seconds and in GPT steps.

ChatTTS generates 4 codes = 2 mel frames = 512 samples at 24 kHz per GPT step, so one
second of audio is 46.875 steps. The prediction drives the token budget and length
buckets, and, for the random-weight models (which never end sensibly on their own),
it *is* the length: a job's duration is then a deterministic function of its text.
"""

from __future__ import annotations

import math
import unicodedata

from tasks.schema import MAX_STEPS

from .chars import is_han

SAMPLE_RATE = 24_000
SAMPLES_PER_STEP = 512
STEPS_PER_SECOND = SAMPLE_RATE / SAMPLES_PER_STEP  # 46.875

# Rough speaking rates at speed 5: ~4.5 CJK characters per second, ~14 Latin
# characters per second (150 words per minute), plus a short pause at punctuation.
_CJK_SECONDS = 0.22
_LATIN_SECONDS = 0.07
_PAUSE_SECONDS = 0.25
_PAUSES = set(",.;:!?，。；：！？、…")


def predicted_seconds(text: str, speed: int = 5) -> float:
    """Seconds of speech the text would take when spoken at `speed` (0 slowest .. 9)."""
    seconds = 0.0
    for ch in text:
        if is_han(ch):
            seconds += _CJK_SECONDS
        elif ch in _PAUSES:
            seconds += _PAUSE_SECONDS
        elif ch.isalnum() or unicodedata.category(ch).startswith("L"):
            seconds += _LATIN_SECONDS
        elif ch.isspace():
            seconds += _LATIN_SECONDS / 2
    # Each speed unit away from 5 changes the rate by about 10 %.
    return seconds / (1.0 + 0.1 * (speed - 5))


def predicted_steps(text: str, speed: int = 5, max_tokens: int = MAX_STEPS) -> int:
    """GPT steps for the text: at least 1, at most `max_tokens`."""
    steps = math.ceil(predicted_seconds(text, speed) * STEPS_PER_SECOND)
    return max(1, min(steps, max_tokens))
