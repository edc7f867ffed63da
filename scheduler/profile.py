"""Arrival profiles for the simulator (scheduler/simulation.py): traffic from a few
numbers, the same jobs for the same seed.

The rate is `base_per_h` outside the peaks and `peak_per_h` inside them: a step, the
hardest case for an autoscaler. Peaks are times of day and repeat every 24 hours.
Arrivals are a Poisson process at that rate. A job is realtime with probability
`realtime_fraction`; its audio length is log-normal around its priority's median (short
prompts, longer bulk segments), within ChatTTS' 1-2048 steps; its deadline, if any, is
its priority's ttl from enqueue.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tasks.schema import MAX_STEPS
from tasks.text.lengths import STEPS_PER_SECOND

from .simulation import BULK, REALTIME, Arrival

DAY_S = 86400.0
MAX_JOBS = 5_000_000  # a profile's bound: a day at about 58 jobs a second


@dataclass(frozen=True)
class Profile:
    duration_s: float = DAY_S
    base_per_h: float = 600.0
    peak_per_h: float = 3000.0
    peaks: tuple[tuple[float, float], ...] = ((9 * 3600.0, 12 * 3600.0), (14 * 3600.0, 17 * 3600.0))
    realtime_fraction: float = 0.3
    realtime_audio_s: float = 4.0  # median seconds of audio of a realtime job
    bulk_audio_s: float = 15.0
    length_sigma: float = 0.5  # of the log-normal: 0.5 puts 2/3 of jobs within 0.6-1.6x the median
    realtime_ttl_s: float | None = None
    bulk_ttl_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.duration_s <= 366 * DAY_S:
            raise ValueError("a profile lasts more than 0 s and at most a year")
        if self.base_per_h < 0 or self.peak_per_h < 0 or max(self.base_per_h, self.peak_per_h) == 0:
            raise ValueError("arrival rates must be >= 0, and one of them > 0")
        if max(self.base_per_h, self.peak_per_h) / 3600 * self.duration_s > MAX_JOBS:
            raise ValueError(f"the profile would have more than {MAX_JOBS} jobs: shorten it or lower the rates")
        for start, end in self.peaks:
            if not 0 <= start < end <= DAY_S:
                raise ValueError(f"a peak is a time-of-day span within 0-24 h, start before end; got {start}-{end} s")
        if not 0 <= self.realtime_fraction <= 1:
            raise ValueError("realtime_fraction must be within 0-1")
        if min(self.realtime_audio_s, self.bulk_audio_s) <= 0 or self.length_sigma < 0:
            raise ValueError("median audio lengths must be > 0 and length_sigma >= 0")
        for ttl in (self.realtime_ttl_s, self.bulk_ttl_s):
            if ttl is not None and ttl <= 0:
                raise ValueError("ttls must be > 0")

    def rate_per_s(self, t: float) -> float:
        day = t % DAY_S
        peak = any(start <= day < end for start, end in self.peaks)
        return (self.peak_per_h if peak else self.base_per_h) / 3600.0


def arrivals(profile: Profile, seed: int = 0) -> list[Arrival]:
    """The profile's jobs in enqueue order: a Poisson process thinned from the highest
    rate, so the draws, and with them the jobs, depend on nothing but the seed."""
    rng = random.Random(seed)
    top = max(profile.base_per_h, profile.peak_per_h) / 3600.0
    out: list[Arrival] = []
    t = 0.0
    # Candidates arrive at the top rate; their count is about top x duration (<= MAX_JOBS).
    for _ in range(4 * MAX_JOBS):
        t += rng.expovariate(top)
        if t >= profile.duration_s:
            return out
        if rng.random() * top >= profile.rate_per_s(t):
            continue
        realtime = rng.random() < profile.realtime_fraction
        median = profile.realtime_audio_s if realtime else profile.bulk_audio_s
        seconds = rng.lognormvariate(math.log(median), profile.length_sigma)
        steps = max(1, min(MAX_STEPS, math.ceil(seconds * STEPS_PER_SECOND)))
        out.append(Arrival(t, steps, REALTIME if realtime else BULK,
                           profile.realtime_ttl_s if realtime else profile.bulk_ttl_s))
    raise RuntimeError("the profile drew more candidates than its bound (a bug)")
