"""Long text -> segments that each fit one job, cut at sentence ends.

Pure and torch-free. A segment is a span of the original text; the spans in order
give back the text exactly (whitespace included), so nothing is dropped or spoken
twice. Cuts are tried from the coarsest kind down: sentence ends (Chinese and English
punctuation, paragraph breaks), then clause marks, then word boundaries (spaces, or
between CJK characters, each of which is a word of its own); only a single "word"
longer than a whole segment is cut inside.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

from tasks.schema import MAX_TEXT_CHARS

from .chars import is_cjk
from .lengths import STEPS_PER_SECOND, predicted_steps

# Well under ChatTTS' 2048-step cap (~43.7 s): the prediction is an estimate, and a
# real voice that speaks slower than predicted would otherwise be cut off mid-sentence.
DEFAULT_MAX_SECONDS = 30.0
DEFAULT_MAX_STEPS = round(DEFAULT_MAX_SECONDS * STEPS_PER_SECOND)

# Closing quotes and brackets stay with the sentence they end. An ASCII quote right
# before a letter or digit opens the next word instead ("，'Hello").
_CLOSERS = "(?:[”’」』》】）)\\]]|[\"'](?![^\\W_]))*"
_SENTENCE_END = re.compile(
    rf"[。！？；…]+{_CLOSERS}\s*"  # CJK ends need no space after them
    rf"|[.!?;]+{_CLOSERS}(?:\s+|$)"  # Latin ends only before a space: "3.14", "a.b" stay whole
    r"|\n[^\S\n]*\n\s*"  # a paragraph break
)
_CLAUSE_END = re.compile(rf"[，、：]+{_CLOSERS}\s*|[,:]+{_CLOSERS}\s+|\s[-–—]+\s+")


@dataclass(frozen=True)
class Segment:
    start: int  # character offsets into the original text
    end: int
    text: str  # the span with whitespace collapsed, as the job schema stores it


def _collapse(span: str) -> str:
    return " ".join(span.split())


def _regex_cuts(pattern: re.Pattern[str]) -> Callable[[str, int, int], list[int]]:
    def cuts(text: str, start: int, end: int) -> list[int]:
        return [m.end() for m in pattern.finditer(text, start, end) if start < m.end() < end]

    return cuts


def _word_cuts(text: str, start: int, end: int) -> list[int]:
    """Positions where a word starts: after whitespace, or next to a CJK character."""
    out = []
    for i in range(start + 1, end):
        prev, ch = text[i - 1], text[i]
        if ch.isspace():
            continue
        if prev.isspace() or is_cjk(prev) or is_cjk(ch):
            out.append(i)
    return out


_LEVELS = (_regex_cuts(_SENTENCE_END), _regex_cuts(_CLAUSE_END), _word_cuts)


class _Packer:
    def __init__(self, text: str, max_chars: int, max_steps: int, speed: int) -> None:
        self.text = text
        self.max_chars = max_chars
        self.max_steps = max_steps
        self.speed = speed

    def fits(self, start: int, end: int) -> bool:
        span = _collapse(self.text[start:end])
        if len(span) > self.max_chars:
            return False
        return predicted_steps(span, self.speed, max_tokens=10**9) <= self.max_steps

    def pack(self, start: int, end: int, level: int = 0) -> Iterator[tuple[int, int]]:
        """Greedily join the units of this level; a unit too long alone goes one level down."""
        if level == len(_LEVELS):
            yield from self._hard_cut(start, end)
            return
        bounds = [start, *_LEVELS[level](self.text, start, end), end]
        cur = start
        for a, b in zip(bounds, bounds[1:]):
            if self.fits(cur, b):
                continue
            if cur < a:
                yield cur, a
            if self.fits(a, b):
                cur = a
            else:
                yield from self.pack(a, b, level + 1)
                cur = b
        if cur < end:
            yield cur, end

    def _hard_cut(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        # Only a single run of non-space characters longer than a whole segment gets here.
        while start < end:
            lo, hi = start + 1, end
            while lo < hi:  # the longest fitting prefix (fitting is monotone in length)
                mid = (lo + hi + 1) // 2
                if self.fits(start, mid):
                    lo = mid
                else:
                    hi = mid - 1
            yield start, lo
            start = lo


def _speakable(text: str, span: tuple[int, int]) -> bool:
    return any(c.isalnum() for c in text[span[0]:span[1]])


def split_text(
    text: str,
    *,
    max_chars: int = MAX_TEXT_CHARS,
    max_steps: int = DEFAULT_MAX_STEPS,
    speed: int = 5,
) -> list[Segment]:
    """Cut `text` into segments of at most `max_chars` characters (whitespace collapsed)
    and `max_steps` predicted GPT steps; whitespace-only text gives no segments."""
    if max_chars < 1 or max_steps < 1:
        raise ValueError("max_chars and max_steps must be positive")
    packer = _Packer(text, max_chars, max_steps, speed)
    spans = list(packer.pack(0, len(text)))
    merged: list[tuple[int, int]] = []
    for i, span in enumerate(spans):
        # Whitespace or punctuation alone ("* * *", "……") is not speech: the engine would
        # fail such a job, so it joins a neighbour when the limits allow.
        if not _speakable(text, span):
            if merged and packer.fits(merged[-1][0], span[1]):
                merged[-1] = (merged[-1][0], span[1])
                continue
            if i + 1 < len(spans) and packer.fits(span[0], spans[i + 1][1]):
                spans[i + 1] = (span[0], spans[i + 1][1])
                continue
        merged.append(span)
    segments = [Segment(a, b, _collapse(text[a:b])) for a, b in merged]
    if len(segments) == 1 and not segments[0].text:
        return []
    return segments
