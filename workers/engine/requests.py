"""What the engine is asked for and what it hands back, one row at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from tasks.schema import MAX_STEPS


@dataclass(frozen=True)
class SynthRequest:
    text: str  # already normalized (Engine.normalize)
    voice: int | str = 2
    seed: int = 0
    speed: int = 5
    temperature: float = 0.3
    top_p: float = 0.7
    top_k: int = 20
    max_tokens: int = MAX_STEPS


@dataclass
class SynthResult:
    audio: np.ndarray | None  # float32 mono at Engine.sample_rate
    steps: int
    error: str | None = None
    codes: np.ndarray | None = None  # [steps, num_vq] audio codes the GPT sampled


# Asked for at most N more requests when rows are free; returns those to start now.
Refill = Callable[[int], Sequence[SynthRequest]]
