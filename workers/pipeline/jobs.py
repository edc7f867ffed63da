"""What a worker holds of a job, and the phases a held job goes through.

A job is held while its broker message is unacked. Its phase says what the worker is
doing with it; the moves between phases are listed here, so a bug that (say) records a
job twice, or runs one that is already running, fails loudly at the move instead of
corrupting a result.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace
from typing import Any

from scheduler.planner import PlanItem
from tasks.schema import JobSpec

from workers.engine.requests import SynthRequest


class Phase(enum.Enum):
    ADMITTED = "admitted"  # its id is its own, it validated, its delivery is counted
    READY = "ready"  # spoken text, voice and content key known: waits for the planner
    RUNNING = "running"  # its row is in the GPU batch
    STORING = "storing"  # its audio is made: being encoded, stored and recorded
    FINISHED = "finished"  # result recorded (success, failure or expiry): ack
    REQUEUED = "requeued"  # goes back to the queue unfinished


_MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.ADMITTED: frozenset({Phase.READY, Phase.FINISHED}),
    Phase.READY: frozenset({Phase.RUNNING, Phase.FINISHED}),
    # READY again: the tick failed while it ran; it is looked at afresh (storage first).
    Phase.RUNNING: frozenset({Phase.STORING, Phase.FINISHED, Phase.READY}),
    Phase.STORING: frozenset({Phase.FINISHED, Phase.REQUEUED, Phase.READY}),
    Phase.FINISHED: frozenset(),
    Phase.REQUEUED: frozenset(),
}


class IllegalMove(RuntimeError):
    """A bug: a held job was moved between phases that do not follow each other."""


@dataclass(eq=False)
class Job:
    id: str
    spec: JobSpec
    kwargs: dict[str, Any]
    arrived: float = field(default_factory=time.monotonic)  # when this worker took it
    phase: Phase = Phase.ADMITTED
    key: str | None = None  # content key, once prepared
    spoken_text: str | None = None  # what the model is given, once prepared
    request: SynthRequest | None = None
    steps: int = 0  # predicted GPT steps, once prepared
    voice: dict[str, Any] | None = None  # the library voice's name and version, once resolved
    dropped: str = ""  # characters the front-end had no reading for, once prepared
    voice_wait: bool = False  # its library voice could not be read yet (logged once)
    cache_checked: bool = False
    suspect: bool = False  # was in a GPU batch that never returned: runs alone (planner)
    started: float | None = None  # when its row joined a GPU batch (monotonic)

    def move(self, to: Phase) -> None:
        if to not in _MOVES[self.phase]:
            raise IllegalMove(f"job {self.id}: {self.phase.value} -> {to.value}")
        self.phase = to

    @property
    def done(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.REQUEUED)


@dataclass(eq=False)
class Work:
    """One synthesis: every held job with the same content key shares it."""

    key: str
    request: SynthRequest
    jobs: list[Job] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return self.jobs[0].steps

    def move(self, to: Phase) -> None:
        for job in self.jobs:
            job.move(to)

    @property
    def realtime(self) -> bool:
        return any(j.spec.priority == "realtime" for j in self.jobs)

    def row(self) -> SynthRequest:
        """What the engine runs: realtime work in the express lane (SynthRequest.express)."""
        return replace(self.request, express=self.realtime)

    def plan_item(self, clock_offset: float) -> PlanItem["Work"]:
        """`clock_offset` turns Unix time into the monotonic clock `arrived` is on."""
        realtime = self.realtime
        # The work expires only when every job sharing it has (a job without a
        # deadline still wants the audio, so the others get it at no extra cost).
        deadlines = [j.spec.deadline() for j in self.jobs]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None) + clock_offset
        return PlanItem(self, self.steps, "realtime" if realtime else "bulk",
                        min(j.arrived for j in self.jobs), deadline, alone=any(j.suspect for j in self.jobs))


@dataclass
class Outcome:
    finished: set[str] = field(default_factory=set)  # result recorded: ack
    requeue: set[str] = field(default_factory=set)  # not done, give back to the broker
