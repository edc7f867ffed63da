"""The worker's scheduling policy: every budget and every batching rule, in one place.

The worker (workers/pipeline/runner.py) and the capacity simulator
(scheduler/simulation.py) both hold one `WorkerPolicy` and ask it the worker's two
questions; neither has a batching rule of its own. Pure: no clock, no I/O, no Celery,
Redis or torch; time is an argument.

Contract (checked by property tests in tests/test_worker_policy.py):
- `start` (the GPU is idle): the planner's `next_batch` with the policy's budgets: a
  batch to start now, the held items that passed their deadline, or how long to wait
  for company (at most `max_wait_s`).
- `admit` (rows of the running batch freed up): what joins the running batch, what
  expired, and whether the batch must stop taking rows (drain) so that it ends:
  - never more rows than are free, never past the token budget still left; rows past
    `max_batch` are for realtime items only, and all free rows are while a realtime
    item's storage lookup is pending (it joins at the next step);
  - nothing joins a batch with refill off, one running a suspect (`solo`), or one that
    has taken rows for `refill_window_s` (it drains: within the visibility timeout,
    and what only a new batch can run gets its turn); a batch told to drain is not
    asked again (its owner remembers);
  - a held item no refill will take and that only a new batch can run (a suspect, one
    larger than the whole budget, or one that aged and does not fit what is left)
    drains the batch: refills would otherwise keep it running past that item forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Sequence, TypeVar

from tasks.schema import MAX_STEPS
from tasks.settings import Settings

from .planner import Decision, PlanItem, Policy, next_batch, refill

T = TypeVar("T")


@dataclass(frozen=True)
class BatchState:
    """What the policy needs to know of the batch in flight."""

    rows: int  # rows running now
    steps: int  # their predicted steps, summed
    age_s: float  # since the batch started
    solo: bool = False  # it runs a suspect: nothing may join it
    lookup_pending: bool = False  # a realtime job's storage lookup is not back yet


@dataclass
class Admit(Generic[T]):
    batch: list[PlanItem[T]] = field(default_factory=list)  # to join the running batch now
    expired: list[PlanItem[T]] = field(default_factory=list)
    drain: bool = False  # take no more rows: the batch ends with its longest row
    why: str = ""  # when draining: the reason, for the log


@dataclass(frozen=True)
class WorkerPolicy:
    planner: Policy  # rows, token budget, wait for company, aging
    realtime_rows: int = 2  # rows past max_batch for realtime items only
    refill: bool = True  # iteration-level batching: freed rows take held items
    refill_window_s: float = 600.0  # a batch takes rows this long, then drains
    prefetch: int = 32  # unacked messages a worker holds (its window)
    tick_s: float = 0.05  # how often the worker looks at its held jobs

    def __post_init__(self) -> None:
        if self.realtime_rows < 0 or self.refill_window_s <= 0 or self.tick_s <= 0:
            raise ValueError("realtime_rows must be >= 0, refill_window_s and tick_s > 0")
        if self.prefetch <= self.planner.max_batch:
            # The window must hold the next batch while one runs, or every batch after
            # the first would start short.
            raise ValueError(f"prefetch ({self.prefetch}) must exceed max_batch ({self.planner.max_batch})")

    @classmethod
    def from_settings(cls, settings: Settings, *, aging_ms: int | None = None, realtime_rows: int | None = None,
                      refill: bool | None = None) -> "WorkerPolicy":
        """The policy of a worker with these settings; the keywords override one setting
        each (the simulator's what-ifs)."""
        max_batch = settings.max_batch
        return cls(
            Policy(
                max_batch=max_batch,
                # Steps one GPU batch may hold (sum of predicted lengths): half the rows at
                # the longest length, so a batch of long jobs stays within memory.
                token_budget=max(MAX_STEPS, max_batch * MAX_STEPS // 2),
                max_wait_s=settings.max_wait_ms / 1000.0,
                aging_s=(settings.aging_ms if aging_ms is None else aging_ms) / 1000.0,
            ),
            realtime_rows=settings.realtime_rows if realtime_rows is None else realtime_rows,
            refill=settings.refill if refill is None else refill,
            # Well within the visibility timeout, past which another worker would get
            # the batch's jobs.
            refill_window_s=min(600.0, settings.visibility_timeout / 4),
            # Two batches' worth: the next batch fills while the current one runs.
            prefetch=max(4, 2 * max_batch),
            # Often enough that a job waits for company about max_wait_ms, never below
            # 10 ms (each tick reads every held job).
            tick_s=max(10, min(settings.max_wait_ms, 50)) / 1000.0,
        )

    @property
    def max_batch(self) -> int:
        return self.planner.max_batch

    @property
    def token_budget(self) -> int:
        return self.planner.token_budget

    @property
    def aging_s(self) -> float:
        return self.planner.aging_s

    @property
    def max_rows(self) -> int:
        """Rows a running batch may hold: max_batch, and realtime rows with refill."""
        return self.max_batch + (self.realtime_rows if self.refill else 0)

    def start(self, held: Sequence[PlanItem[T]], now: float) -> Decision[T]:
        """The GPU is idle: the batch to start, the expired items, or the wait."""
        return next_batch(held, now, self.planner)

    def closed(self, running: BatchState) -> str | None:
        """Why `running` takes no more rows whatever is held, or None: ask this before
        reading what is held (the runner's admission of new messages costs Redis calls)."""
        if not self.refill or running.solo:
            return "refill is off for this batch"
        if running.age_s > self.refill_window_s:
            return f"the batch has taken new rows for {self.refill_window_s:.0f} s"
        return None

    def admit(self, held: Sequence[PlanItem[T]], now: float, running: BatchState) -> Admit[T]:
        """Rows freed up in `running`: what joins it, what expired, whether it drains."""
        why = self.closed(running)
        if why is not None:
            return Admit(drain=True, why=why)
        free = self.max_rows - running.rows
        left = self.token_budget - running.steps
        # Of the free rows, those past max_batch are for realtime items only; all are while
        # a realtime item's storage lookup is not back yet (a step or so).
        bulk_free = 0 if running.lookup_pending else max(0, self.max_batch - running.rows)
        decision = refill(held, now, self.planner, free, left, reserved=max(0, free - bulk_free))
        taken = {id(i) for i in decision.batch} | {id(i) for i in decision.expired}
        blocked = [i for i in held if id(i) not in taken and self.needs_own_batch(i, now, left)]
        return Admit(decision.batch, decision.expired, drain=bool(blocked),
                     why="a held job needs a batch of its own" if blocked else "")

    def needs_own_batch(self, item: PlanItem[T], now: float, steps_left: int) -> bool:
        """An item no refill will take: a suspect, one larger than any batch's budget, or
        one that has waited past the aging time and does not fit in what is left."""
        return (item.alone or item.steps > self.token_budget
                or (item.steps > steps_left and now - item.arrived >= self.aging_s))
