"""What the engine is asked for and what it hands back, one row at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    import torch

from tasks.schema import MAX_STEPS


@dataclass(frozen=True)
class Blend:
    """A weighted blend of speaker embeddings (a library `mix` voice)."""

    parts: tuple[tuple["Voice", float], ...]


@dataclass(frozen=True)
class Reference:
    """A voice from a recording: its audio codes and transcript go into the row's prompt
    (ChatTTS' spk_smp + txt_smp). Equal (and cached) by the recording's digest."""

    digest: str
    transcript: str  # already normalized, like a job's text
    codes: torch.Tensor = field(compare=False, repr=False)  # [positions, num_vq] on the engine's device


# An int is a seed, a str a ChatTTS speaker string.
Voice = Union[int, str, Blend, Reference]


@dataclass(frozen=True)
class SynthRequest:
    text: str  # already normalized (Engine.normalize)
    voice: Voice = 2
    seed: int = 0
    speed: int = 5
    temperature: float = 0.3
    top_p: float = 0.7
    top_k: int = 20
    max_tokens: int = MAX_STEPS
    # Steps in a lane of its own, ahead of the other rows (which wait, their cache kept):
    # a realtime job that joins a batch of long bulk rows ends at a small batch's step
    # rate, not the big batch's.
    express: bool = False


@dataclass
class SynthResult:
    audio: np.ndarray | None  # float32 mono at Engine.sample_rate
    steps: int
    error: str | None = None
    codes: np.ndarray | None = None  # [steps, num_vq] audio codes the GPT sampled


@dataclass(frozen=True)
class RowsFree:
    """A running batch has `rows` free rows: requests added now join it at its next step."""

    rows: int


# What a batch stream yields: a row that ended (its index in the stream's order, its
# result), or its free rows.
Event = Union[tuple[int, SynthResult], RowsFree]


class BatchStream:
    """One running batch, as its owner sees it: iterate for its events, and answer a
    RowsFree with `add` (or not). The engine computes; whoever iterates decides what
    joins, and does its I/O between steps, outside the engine's loop."""

    def __init__(self, run: Callable[[list[SynthRequest]], Iterator[Event]]) -> None:
        self._inbox: list[SynthRequest] = []
        self._events = run(self._inbox)

    def __iter__(self) -> Iterator[Event]:
        return self._events

    def add(self, requests: Sequence[SynthRequest]) -> None:
        self._inbox.extend(requests)


# Asked for at most N more requests when rows are free; returns those to start now.
Refill = Callable[[int], Sequence[SynthRequest]]


def finished_rows(stream: BatchStream, refill: Refill | None = None) -> Iterator[tuple[int, SynthResult]]:
    """The rows of `stream` as they end, its free rows filled from `refill` (none: the
    batch takes no new rows)."""
    for event in stream:
        if isinstance(event, RowsFree):
            if refill is not None:
                stream.add(refill(event.rows))
        else:
            yield event
