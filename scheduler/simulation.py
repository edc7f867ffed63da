"""Capacity planning by simulation: a profile of arrivals against a fleet of workers.

A discrete-event simulation of the queue, the workers and the autoscaler. Batching is
not modelled but run: every decision a worker takes about its held jobs is its
`WorkerPolicy`'s (scheduler/worker_policy.py: `start` when the GPU is free, `admit`
when rows of the running batch free up; the worker's own object, with every budget:
rows, token budget, realtime rows, refill window, prefetch), at the moments the real
worker would ask. Around it, the worker (workers/pipeline/runner.py, workers/broker/gpu_batches.py,
workers/engine/engine.py) is modelled, not run:

- Redis: one list per queue; a worker takes `tts.realtime` before `tts.bulk`
  (`queue_order_strategy: priority`, tasks/celery_app.py), one message at a time, while it holds
  fewer than `prefetch` unacked jobs (its running rows count: a job is acked once its
  row is stored). A new message goes to the worker that has waited longest for one
  (Redis serves blocked BRPOP clients in order).
- The GPU: a running batch steps all its rows together; a step with n rows takes
  n / (audio_s_per_s(n) x 46.875) seconds, audio_s_per_s from the `ttspool bench` curve.
  Rows that end leave at once; with refill (TTSPOOL_REFILL, on by default) held jobs
  join in their place, up to max_batch rows and `realtime_rows` more for realtime jobs
  only; while a realtime row runs, only the realtime rows step (the engine's express
  lane). A batch stops taking rows when the policy drains it, and then ends with its
  longest row. Rows are modelled,
  not whole batches, because the worker runs this way by default: with batches that
  end at their longest row, every realtime job would wait behind a whole bulk batch,
  which the worker no longer does (`refill=False` models TTSPOOL_REFILL=0).
- Queue wait, as `ttspool_queue_wait_seconds` measures it: from enqueue to the moment
  the job's row joins a GPU batch. A job past its deadline before that is expired.
- KEDA: every `poll_s` the jobs in the Redis lists (not those prefetched by workers,
  which KEDA cannot see either) over `target` give the wanted workers (the HPA's
  AverageValue rule, 10 % tolerance); scale-up at most max(4, current) workers per poll,
  each paid from the decision and serving after `reaction_s + load_s`; scale-down one
  worker per `down_period_s` at most, to the highest count wanted in the last
  `down_window_s`. A removed worker stops gracefully: its held jobs go back to the
  queue, its running batch ends without new rows.

Approximations (the simulator's error budget): the bench's `audio_s_per_s` at batch
size B is read as the throughput of B rows stepping together, although the bench's
batches lose rows as they end (its B rows are fewer on average: the model is slightly
pessimistic); throughput is interpolated linearly between measured sizes, through zero
below the smallest one and flat above the largest one; prefill, decoding and storage
cost only what they cost inside the bench's throughput; the worker's 50 ms scheduler
tick, storage lookups, duplicate merging and failures are left out; a job's length is
its predicted length.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

from tasks.schema import MAX_STEPS
from tasks.text.lengths import STEPS_PER_SECOND

from .planner import PlanItem
from .worker_policy import BatchState, WorkerPolicy

REALTIME, BULK = "realtime", "bulk"
PRIORITIES = (REALTIME, BULK)
_EPS_STEPS = 1e-6  # a row this close to its end has ended (float rounding of step sums)
_MIN_DELAY_S = 1e-6  # a wake-up never at `now` itself: the clock must move on


@dataclass(frozen=True)
class Arrival:
    t: float  # when the producer enqueued it, seconds from the profile's start
    steps: int  # predicted GPT steps
    priority: str = BULK
    ttl_s: float | None = None  # deadline, from enqueue

    def __post_init__(self) -> None:
        if not (math.isfinite(self.t) and self.t >= 0):
            raise ValueError(f"arrival time must be a finite number >= 0, got {self.t}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be 1-{MAX_STEPS}, got {self.steps}")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be realtime or bulk, got {self.priority!r}")
        if self.ttl_s is not None and not self.ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {self.ttl_s}")


@dataclass(frozen=True)
class Curve:
    """One worker's throughput against the rows it runs at once: (batch size, audio
    seconds per wall second), as `ttspool bench --json-out` measured it."""

    points: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        sizes = [b for b, _ in self.points]
        if not self.points or sizes != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError("a curve needs batch sizes >= 1, each once, in increasing order")
        if not all(math.isfinite(v) and v > 0 for _, v in self.points):
            raise ValueError("a curve's audio_s_per_s values must be > 0")

    @classmethod
    def from_bench(cls, result: Mapping[str, Any]) -> "Curve":
        """From `ttspool bench --json-out`: its runs in the "drop" mode, the one it
        measures at every batch size (finished rows leave the batch)."""
        runs = result.get("runs")
        if not isinstance(runs, list):
            raise ValueError("not a `ttspool bench --json-out` file: no \"runs\" list")
        points = {int(r["batch_size"]): float(r["audio_s_per_s"]) for r in runs
                  if isinstance(r, dict) and r.get("mode") == "drop"}
        if not points:
            raise ValueError("the bench file has no runs in the \"drop\" mode")
        return cls(tuple(sorted(points.items())))

    @classmethod
    def parse(cls, raw: str) -> "Curve":
        """From "1:0.9,8:4.1,32:7.5" (batch size: audio seconds per second)."""
        try:
            pairs = [p.split(":") for p in raw.split(",") if p.strip()]
            return cls(tuple(sorted((int(b), float(v)) for b, v in pairs)))
        except ValueError as err:
            raise ValueError(f"a curve is SIZE:AUDIO_S_PER_S,... like 1:0.9,8:4.1 ({err})") from None

    def audio_s_per_s(self, rows: int) -> float:
        sizes = [b for b, _ in self.points]
        if rows >= sizes[-1]:
            return self.points[-1][1]
        i = bisect_left(sizes, rows)
        (b0, v0) = self.points[i - 1] if i > 0 else (0, 0.0)
        (b1, v1) = self.points[i]
        return v0 + (v1 - v0) * (rows - b0) / (b1 - b0)

    def step_s(self, rows: int) -> float:
        """Wall seconds of one GPT step of `rows` rows."""
        return rows / (self.audio_s_per_s(rows) * STEPS_PER_SECOND)


@dataclass(frozen=True)
class WorkerModel:
    """One worker: its throughput curve, and the policy it batches with (the worker's
    own object, scheduler.worker_policy: every budget and rule comes from there)."""

    curve: Curve
    policy: WorkerPolicy


@dataclass(frozen=True)
class Scaling:
    """KEDA on queue depth (deploy/k8s/keda.yaml); min == max is a fixed fleet."""

    min_workers: int = 1
    max_workers: int = 8
    target: float = 64.0  # waiting jobs per worker (scalingModifiers.target)
    poll_s: float = 15.0  # pollingInterval
    reaction_s: float = 30.0  # from the decision to a running pod: scheduling, image, start
    load_s: float = 60.0  # model load, before a new worker takes jobs
    down_window_s: float = 300.0  # scaleDown.stabilizationWindowSeconds
    down_period_s: float = 180.0  # one worker removed per this period at most
    tolerance: float = 0.1  # the HPA's: no change within 10 % of the target
    # False: a fixed fleet of max_workers, never polled. True with min == max is KEDA
    # that cannot move, kept apart so that a search keeps the autoscaler's min_workers.
    autoscale: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers or self.max_workers < 1:
            raise ValueError(f"workers must satisfy 0 <= min <= max, max >= 1; got {self.min_workers}-{self.max_workers}")
        if self.target <= 0 or self.poll_s <= 0:
            raise ValueError("the scaling target and poll interval must be > 0")
        if min(self.reaction_s, self.load_s, self.down_window_s, self.down_period_s, self.tolerance) < 0:
            raise ValueError("scaling delays, windows and the tolerance must be >= 0")

    @classmethod
    def fixed(cls, workers: int) -> "Scaling":
        return cls(min_workers=workers, max_workers=workers, autoscale=False)

    @property
    def is_fixed(self) -> bool:
        return not self.autoscale


@dataclass(frozen=True)
class Waits:
    """Queue waits of one priority. Jobs that expired or never started count as waiting
    forever in the percentiles (a p99 of inf: more than 1 % never ran); the mean is over
    the jobs that started."""

    jobs: int
    started: int
    expired: int
    unstarted: int  # neither started nor expired when the simulation ended
    mean_s: float | None
    p50_s: float | None
    p99_s: float | None
    max_s: float | None

    @classmethod
    def of(cls, waits: Sequence[float], expired: int, unstarted: int) -> "Waits":
        xs = sorted(waits) + [math.inf] * (expired + unstarted)
        if not xs:
            return cls(0, 0, 0, 0, None, None, None, None)

        def rank(q: float) -> float:  # nearest rank: a value that occurred
            return xs[max(0, math.ceil(q * len(xs)) - 1)]

        return cls(len(xs), len(waits), expired, unstarted, sum(waits) / len(waits) if waits else None,
                   rank(0.5), rank(0.99), xs[-1])


@dataclass(frozen=True)
class Sample:
    t: float
    queued: int  # in the Redis lists: what KEDA sees
    held: int  # prefetched by workers, waiting for a GPU row
    running: int  # rows in GPU batches
    workers: int  # provisioned (paid for)
    ready: int  # serving


@dataclass(frozen=True)
class Report:
    waits: dict[str, Waits]
    duration_s: float  # the profile's span
    end_s: float  # the last job done, or the drain limit
    gpu_hours: float
    busy_hours: float  # with a batch running
    mean_rows: float  # rows stepping together, on average while busy
    peak_workers: int  # provisioned at once, stopping ones included (they are paid for until gone)
    peak_replicas: int  # not stopping, at once: the autoscaler's max_workers that gives the same run
    max_queued: int  # the most jobs in the Redis lists at once (0: a worker took each job as it came)
    timeline: tuple[Sample, ...] = field(repr=False)

    @property
    def utilization(self) -> float:
        return self.busy_hours / self.gpu_hours if self.gpu_hours else 0.0

    def meets(self, realtime_p99_s: float | None, bulk_p99_s: float | None = None) -> bool:
        for prio, target in ((REALTIME, realtime_p99_s), (BULK, bulk_p99_s)):
            w = self.waits[prio]
            if target is not None and w.jobs and not (w.p99_s is not None and w.p99_s <= target):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        def finite(x: float | None) -> float | str | None:
            return x if x is None or math.isfinite(x) else "inf"

        return {
            "waits": {p: {k: finite(v) if isinstance(v, float) else v for k, v in asdict(w).items()}
                      for p, w in self.waits.items()},
            "duration_s": self.duration_s, "end_s": self.end_s, "gpu_hours": self.gpu_hours,
            "busy_hours": self.busy_hours, "utilization": self.utilization, "mean_rows": self.mean_rows,
            "peak_workers": self.peak_workers,
            "peak_replicas": self.peak_replicas, "max_queued": self.max_queued,
            "timeline": {k: [getattr(s, k) for s in self.timeline] for k in Sample.__dataclass_fields__},
        }


class _Job:
    __slots__ = ("arrival", "deadline", "start", "expired")

    def __init__(self, arrival: Arrival) -> None:
        self.arrival = arrival
        self.deadline = None if arrival.ttl_s is None else arrival.t + arrival.ttl_s
        self.start: float | None = None
        self.expired = False


class _Row:
    __slots__ = ("job", "left")

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.left = float(job.arrival.steps)


class _Worker:
    def __init__(self, wid: int, paid_from: float, ready_at: float) -> None:
        self.id = wid
        self.paid_from = paid_from
        self.ready_at = ready_at
        self.gone_at: float | None = None
        self.stopping = False
        self.held: list[PlanItem[_Job]] = []
        self.express: list[_Row] = []  # realtime rows: while there are any, only they step
        self.bulk: list[_Row] = []
        self.batch_since: float | None = None
        self.draining = False  # the running batch takes no more rows
        self.wait_until: float | None = None  # the planner asked to wait for company
        self.clock = paid_from  # the rows have stepped up to this time
        self.last_take = -math.inf
        self.version = 0  # wake-ups of older versions are stale
        self.busy_s = 0.0
        self.row_s = 0.0

    @property
    def rows(self) -> int:
        return len(self.express) + len(self.bulk)

    @property
    def alive(self) -> bool:
        return self.gone_at is None

    def serving(self, now: float) -> bool:
        return self.alive and not self.stopping and now >= self.ready_at


# Heap events; arrivals come from the sorted list instead (no heap entry per job).
_WAKE, _READY, _POLL, _SAMPLE = range(4)


class _Simulation:
    def __init__(self, arrivals: Sequence[Arrival], model: WorkerModel, scaling: Scaling,
                 sample_s: float, drain_s: float) -> None:
        self.arrivals = sorted(arrivals, key=lambda a: a.t)
        self.model = model
        self.policy = model.policy
        self.scaling = scaling
        self.sample_s = sample_s
        self.duration = self.arrivals[-1].t if self.arrivals else 0.0
        self.limit = self.duration + drain_s
        self.step_s = [math.inf] + [model.curve.step_s(n) for n in range(1, model.policy.max_rows + 1)]
        self.jobs: list[_Job] = []
        self.queues: dict[str, deque[_Job]] = {REALTIME: deque(), BULK: deque()}
        self.workers: list[_Worker] = []
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.open = len(self.arrivals)  # jobs neither done nor expired
        self.recent: deque[tuple[float, int]] = deque()  # (poll time, workers wanted)
        self.last_down = -math.inf
        self.samples: list[Sample] = []
        self.last_done = 0.0  # when the last row ended
        self.peak = 0  # workers provisioned at once
        self.peak_replicas = 0  # workers provisioned and not stopping, at once
        self.max_queued = 0  # jobs in the Redis lists at once, after the workers took theirs

    # -- the event loop -------------------------------------------------------------

    def push(self, t: float, kind: int, ref: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, ref))

    def run(self) -> Report:
        for _ in range(self.scaling.min_workers):
            self.add_worker(0.0, ready_at=0.0)  # the fleet is warm when the profile starts
        if self.scaling.min_workers < self.scaling.max_workers:
            self.push(self.scaling.poll_s, _POLL)
        self.push(0.0, _SAMPLE)
        nxt = 0
        end = self.limit
        # Each job causes a bounded number of events (its arrival, a take, a row start
        # and end, an aging and a deadline wake-up per worker holding it, the batches it
        # is in); polls and samples are bounded by the drain limit.
        budget = 64 * (len(self.arrivals) + 1) * max(1, self.model.policy.max_rows) \
            + 4 * int(self.limit / self.sample_s + self.limit / self.scaling.poll_s) + 1000
        for _ in range(budget):
            t_arr = self.arrivals[nxt].t if nxt < len(self.arrivals) else math.inf
            t_evt = self.events[0][0] if self.events else math.inf
            now = min(t_arr, t_evt)
            if now > self.limit or (self.open == 0 and now > self.duration):
                end = self.limit if self.open else max(self.duration, self.last_done)
                break
            if t_arr <= t_evt:
                self.arrive(self.arrivals[nxt], now)
                nxt += 1
                continue
            _, _, kind, ref = heapq.heappop(self.events)
            if kind == _WAKE:
                worker, version = ref
                if version == worker.version and worker.alive:
                    self.poke(worker, now)
            elif kind == _READY:
                if ref.serving(now):
                    self.poke(ref, now)
                    self.feed(now)
            elif kind == _POLL:
                self.poll(now)
                self.push(now + self.scaling.poll_s, _POLL)
            else:
                self.sample(now)
                self.push(now + self.sample_s, _SAMPLE)
        else:
            raise RuntimeError("the simulation did not end within its event budget (a bug)")
        return self.report(end)

    # -- Redis ----------------------------------------------------------------------

    def arrive(self, arrival: Arrival, now: float) -> None:
        job = _Job(arrival)
        self.jobs.append(job)
        self.queues[arrival.priority].append(job)
        self.feed(now)
        self.max_queued = max(self.max_queued, self.queued())

    def queued(self) -> int:
        return len(self.queues[REALTIME]) + len(self.queues[BULK])

    def feed(self, now: float) -> None:
        """Jobs in Redis to the workers with free prefetch slots, the longest waiting first."""
        for _ in range(len(self.workers) + 1):
            if not self.queued():
                return
            free = [w for w in self.workers if w.serving(now) and self.free(w) > 0]
            if not free:
                return
            self.poke(min(free, key=lambda w: (w.last_take, w.id)), now)

    def free(self, w: _Worker) -> int:
        return self.model.policy.prefetch - w.rows - len(w.held)

    def take(self, w: _Worker, now: float) -> None:
        while self.free(w) > 0 and self.queued() and w.serving(now):
            q = self.queues[REALTIME] or self.queues[BULK]
            job = q.popleft()
            w.held.append(PlanItem(job, job.arrival.steps, job.arrival.priority, now, job.deadline))
            w.last_take = now

    # -- a worker -------------------------------------------------------------------

    def poke(self, w: _Worker, now: float) -> None:
        """Something changed at `w` (or its clock ran out): step its rows up to `now`,
        take jobs, let the planner decide, and set its next wake-up."""
        self.advance(w, now)
        for _ in range(len(self.arrivals) + 1):
            self.take(w, now)
            if not self.plan(w, now):
                break  # nothing expired: no slot freed, nothing more to take
        if w.stopping and not w.rows:
            w.gone_at = now
        self.schedule(w, now)

    def advance(self, w: _Worker, now: float) -> None:
        lane = w.express or w.bulk
        elapsed = now - w.clock
        w.clock = now
        if not lane:
            return
        if elapsed > 0:
            n = len(lane)
            steps = elapsed / self.step_s[n]
            w.busy_s += elapsed
            w.row_s += elapsed * n
            for row in lane:
                row.left -= steps
        ended = [r for r in lane if r.left <= _EPS_STEPS]
        if ended:
            lane[:] = [r for r in lane if r.left > _EPS_STEPS]
            self.open -= len(ended)
            self.last_done = now

    def plan(self, w: _Worker, now: float) -> bool:
        """The worker policy's decision for `w`'s held jobs; whether any expired (slots freed)."""
        w.wait_until = None
        if w.stopping or not w.held:
            return False
        if w.rows:
            if w.draining or w.rows >= self.policy.max_rows:
                return False  # the worker is asked only when rows are free
            assert w.batch_since is not None
            steps = sum(r.job.arrival.steps for r in (*w.express, *w.bulk))
            admit = self.policy.admit(w.held, now, BatchState(w.rows, steps, now - w.batch_since))
            w.draining = admit.drain
            batch, expired = admit.batch, admit.expired
        else:
            w.batch_since, w.draining = None, False
            decision = self.policy.start(w.held, now)
            batch, expired = decision.batch, decision.expired
            if batch:
                w.batch_since = now
            elif not expired:
                w.wait_until = now + max(decision.wait_s, _MIN_DELAY_S)
        gone = {id(i) for i in batch} | {id(i) for i in expired}
        if gone:
            w.held = [i for i in w.held if id(i) not in gone]
        for item in expired:
            item.payload.expired = True
            self.open -= 1
        for item in batch:
            item.payload.start = now
            (w.express if item.priority == REALTIME else w.bulk).append(_Row(item.payload))
        return bool(expired)

    def schedule(self, w: _Worker, now: float) -> None:
        w.version += 1
        if not w.alive:
            return
        wake = math.inf
        lane = w.express or w.bulk
        if lane:
            wake = now + min(r.left for r in lane) * self.step_s[len(lane)]
        if w.held and not w.stopping:
            if w.wait_until is not None:
                wake = min(wake, w.wait_until)
            # The planner's answer also changes when a held job ages into realtime rank,
            # passes its deadline, or the batch's refill window closes.
            aging = self.policy.aging_s
            for item in w.held:
                if item.priority == BULK and item.arrived + aging > now:
                    wake = min(wake, item.arrived + aging)
                if item.deadline is not None and item.deadline >= now:
                    wake = min(wake, item.deadline + _MIN_DELAY_S)
            if w.rows and not w.draining and w.batch_since is not None:
                closes = w.batch_since + self.policy.refill_window_s + _MIN_DELAY_S
                if closes > now:
                    wake = min(wake, closes)
        if wake < math.inf:
            self.push(max(wake, now + _MIN_DELAY_S), _WAKE, (w, w.version))

    # -- the fleet ------------------------------------------------------------------

    def add_worker(self, now: float, ready_at: float) -> None:
        w = _Worker(len(self.workers), now, ready_at)
        self.workers.append(w)
        self.peak = max(self.peak, sum(1 for w in self.workers if w.alive))
        self.peak_replicas = max(self.peak_replicas, sum(1 for w in self.workers if w.alive and not w.stopping))
        self.push(ready_at, _READY, w)

    def stop_worker(self, now: float) -> None:
        """One worker goes: one still starting if any, else the newest (a ReplicaSet
        removes unready and young pods first)."""
        live = [w for w in self.workers if w.alive and not w.stopping]
        w = max(live, key=lambda w: (now < w.ready_at, w.paid_from, w.id))
        self.advance(w, now)
        w.stopping = True
        # A warm shutdown: held jobs go back to the queue (at its head: they are the
        # oldest), the running batch ends without new rows.
        for item in reversed(w.held):
            self.queues[item.priority].appendleft(item.payload)
        w.held = []
        if not w.rows:
            w.gone_at = now
        self.schedule(w, now)
        self.feed(now)
        self.max_queued = max(self.max_queued, self.queued())

    def poll(self, now: float) -> None:
        s = self.scaling
        current = sum(1 for w in self.workers if w.alive and not w.stopping)
        metric = self.queued()
        wanted = math.ceil(metric / s.target)
        if current and abs(metric / (s.target * current) - 1) <= s.tolerance:
            wanted = current
        wanted = min(s.max_workers, max(s.min_workers, wanted))
        self.recent.append((now, wanted))
        while self.recent and self.recent[0][0] < now - s.down_window_s:
            self.recent.popleft()
        if wanted > current:
            for _ in range(min(wanted, current + max(4, current)) - current):
                self.add_worker(now, now + s.reaction_s + s.load_s)
        elif max(n for _, n in self.recent) < current and now - self.last_down >= s.down_period_s:
            self.last_down = now
            self.stop_worker(now)

    def sample(self, now: float) -> None:
        self.samples.append(Sample(
            now, self.queued(), sum(len(w.held) for w in self.workers if w.alive),
            sum(w.rows for w in self.workers if w.alive), sum(1 for w in self.workers if w.alive),
            sum(1 for w in self.workers if w.serving(now))))

    # -- results --------------------------------------------------------------------

    def report(self, end: float) -> Report:
        for w in self.workers:
            if w.alive:
                self.advance(w, end)
        waits: dict[str, list[float]] = {p: [] for p in PRIORITIES}
        expired = dict.fromkeys(PRIORITIES, 0)
        unstarted = dict.fromkeys(PRIORITIES, 0)
        for job in self.jobs:  # every arrival: the loop ends after the last one
            p = job.arrival.priority
            if job.start is not None:
                waits[p].append(job.start - job.arrival.t)
            elif job.expired:
                expired[p] += 1
            else:
                unstarted[p] += 1
        paid = sum(min(end, w.gone_at if w.gone_at is not None else end) - w.paid_from for w in self.workers)
        busy = sum(w.busy_s for w in self.workers)
        return Report(
            {p: Waits.of(waits[p], expired[p], unstarted[p]) for p in PRIORITIES},
            self.duration, end, max(0.0, paid) / 3600.0, busy / 3600.0,
            sum(w.row_s for w in self.workers) / busy if busy else 0.0,
            self.peak, self.peak_replicas, self.max_queued, tuple(self.samples))


def simulate(arrivals: Sequence[Arrival], model: WorkerModel, scaling: Scaling, *,
             sample_s: float | None = None, drain_s: float | None = None) -> Report:
    """Replay `arrivals` against a fleet of `model` workers scaled by `scaling`.

    Deterministic: the same inputs give the same report. Runs until every job started
    or expired and the profile is over, or `drain_s` (default: the profile's span, at
    least an hour) past the last arrival; jobs not started by then are reported as such.
    `sample_s` spaces the timeline's samples (default: about 1000 over the profile)."""
    span = max((a.t for a in arrivals), default=0.0)
    sample_s = sample_s if sample_s is not None else max(1.0, span / 1000)
    drain_s = drain_s if drain_s is not None else max(3600.0, span)
    if sample_s <= 0 or drain_s < 0:
        raise ValueError("sample_s must be > 0 and drain_s >= 0")
    return _Simulation(arrivals, model, scaling, sample_s, drain_s).run()


def mean_wait(report: Report) -> float | None:
    """Mean queue wait of every job that started, all priorities together."""
    started = sum(w.started for w in report.waits.values())
    return sum((w.mean_s or 0.0) * w.started for w in report.waits.values()) / started if started else None


def curve_scale_for(arrivals: Sequence[Arrival], model: WorkerModel, scaling: Scaling, mean_wait_s: float,
                    low: float = 0.125, high: float = 8.0, rounds: int = 30) -> float | None:
    """The factor on the curve's throughput with which the simulated mean queue wait is
    `mean_wait_s`: how much slower (below 1) or faster than its curve a real worker
    behaved on the same arrivals. Bisection on a log scale (waits fall as throughput
    rises); None when even `low` or `high` cannot explain the wait."""
    def wait(factor: float) -> float:
        curve = Curve(tuple((b, v * factor) for b, v in model.curve.points))
        return mean_wait(simulate(arrivals, replace(model, curve=curve), scaling)) or 0.0

    if not wait(high) <= mean_wait_s <= wait(low):
        return None
    for _ in range(rounds):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if wait(mid) > mean_wait_s else (low, mid)
    return math.sqrt(low * high)


# Why a search gave up.
MISSED_AUTOSCALER = "autoscaler"  # it used fewer workers than its max: a higher max gives the same run
# Twice the workers waited no less, and took every job as it came: the wait left is the
# workers' own (for batch-mates, and the batches ahead of a job), not the fleet's size.
MISSED_PLATEAU = "plateau"
MISSED_LIMIT = "limit"  # no fleet up to the search's limit


@dataclass(frozen=True)
class Search:
    """The smallest fleet meeting the p99 targets: fixed workers, or the autoscaler's
    max_workers; or, when the search gave up (`missed` says why), the fleet it stopped at."""

    scaling: Scaling  # the fleet found, or the one the search stopped at
    report: Report
    fewer: Report | None  # one worker less, which misses the target; None: no smaller fleet, or missed
    runs: int
    missed: str | None = None  # MISSED_AUTOSCALER, MISSED_PLATEAU or MISSED_LIMIT; None: met

    @property
    def met(self) -> bool:
        return self.missed is None

    @property
    def workers(self) -> int:
        return self.scaling.max_workers


def _p99s(report: Report, realtime_p99_s: float | None, bulk_p99_s: float | None) -> list[float]:
    """The p99 waits of the priorities with a target and jobs (inf: more than 1 % never ran)."""
    out = []
    for prio, target in ((REALTIME, realtime_p99_s), (BULK, bulk_p99_s)):
        w = report.waits[prio]
        if target is not None and w.jobs:
            out.append(math.inf if w.p99_s is None else w.p99_s)
    return out


def smallest_fleet(simulate_with: Callable[[Scaling], Report], scaling: Scaling, realtime_p99_s: float | None,
                   bulk_p99_s: float | None = None, limit: int = 1024) -> Search:
    """Smallest workers (a fixed fleet) or max_workers (autoscaled, min_workers kept) whose
    report meets the p99 targets: doubling, then bisection. Assumes more workers never
    wait longer, which holds for a queue served by identical workers up to the noise of
    batching; the result's `fewer` shows the fleet just below missing it.

    The doubling gives up, with the fleet it reached, when the autoscaler did not use all
    its workers (the run is deterministic: a higher max gives the same run), when twice
    the fixed fleet brought no p99 down with every job taken as it came, or past `limit`
    workers."""
    if realtime_p99_s is None and bulk_p99_s is None:
        raise ValueError("give a realtime or a bulk p99 target")

    def fleet(n: int) -> Scaling:
        return Scaling.fixed(n) if scaling.is_fixed else replace(scaling, max_workers=n)

    done: dict[int, Report] = {}

    def meets(n: int) -> bool:
        if n not in done:
            done[n] = simulate_with(fleet(n))
        return done[n].meets(realtime_p99_s, bulk_p99_s)

    def missed(n: int, why: str) -> Search:
        return Search(fleet(n), done[n], None, len(done), why)

    floor = 1 if scaling.is_fixed else max(1, scaling.min_workers)
    low, high = floor - 1, floor  # low: assumed to miss (no workers, or below the autoscaler's min)
    while not meets(high):
        if not scaling.is_fixed and done[high].peak_replicas < high:
            return missed(high, MISSED_AUTOSCALER)
        # A p99 flat from n to 2n workers alone proves nothing (realtime jobs wait behind
        # the bulk jobs filling every prefetch slot until the fleet outgrows the backlog);
        # with no job ever left in Redis, every job went to a worker as it came.
        if scaling.is_fixed and low in done and done[high].max_queued == 0 and all(
                math.isfinite(q) and q >= p for p, q in zip(_p99s(done[low], realtime_p99_s, bulk_p99_s),
                                                            _p99s(done[high], realtime_p99_s, bulk_p99_s))):
            return missed(high, MISSED_PLATEAU)
        if high * 2 > limit:
            return missed(high, MISSED_LIMIT)
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if meets(mid) else (mid, high)
    # The bisection ends with low = high - 1 tested, unless no fleet is smaller.
    fewer = done[high - 1] if high > floor else None
    return Search(fleet(high), done[high], fewer, len(done))


@dataclass(frozen=True)
class Remedies:
    """What meets the targets an autoscaled search missed; each None where nothing tried did.
    The autoscaled ones run with a max_workers they need not reach: their report's
    peak_replicas is the max they need (a higher max gives the same run)."""

    fixed: Search | None  # the smallest fixed fleet
    min_workers: Search | None  # the autoscaler with the smallest min_workers that meets them
    keda_target: Search | None  # the autoscaler with the largest target (halving it) that meets them
    runs: int


def remedies(simulate_with: Callable[[Scaling], Report], missed: Search, realtime_p99_s: float | None,
             bulk_p99_s: float | None = None, limit: int = 1024) -> Remedies:
    """For `missed`, an autoscaled search that gave up: the fixed fleet, the autoscaler's
    min_workers and its target (waiting jobs per worker) that meet the p99 targets."""
    asked = missed.scaling
    if asked.is_fixed:
        raise ValueError("remedies are for an autoscaled search: a fixed fleet's search is its own remedy")
    fixed = smallest_fleet(simulate_with, Scaling.fixed(1), realtime_p99_s, bulk_p99_s, limit)
    if not fixed.met:
        return Remedies(None, None, None, fixed.runs)
    cap = max(asked.max_workers, 2 * fixed.workers)
    runs = fixed.runs

    def autoscaled(**change: Any) -> Search | None:
        nonlocal runs
        s = replace(asked, **{"max_workers": max(cap, change.get("min_workers", 0)), **change})
        runs += 1
        r = simulate_with(s)
        return Search(s, r, None, 1) if r.meets(realtime_p99_s, bulk_p99_s) else None

    # The min_workers search: between the asked min (which missed) and the fixed fleet
    # that meets (a floor that high never has fewer workers than it).
    low, high = asked.min_workers, fixed.workers
    best = autoscaled(min_workers=high)
    while best is not None and high - low > 1:
        mid = (low + high) // 2
        found = autoscaled(min_workers=mid)
        low, high, best = (low, mid, found) if found is not None else (mid, high, best)
    target, lower = asked.target / 2, None
    while lower is None and target >= 1:
        lower = autoscaled(target=target)
        target /= 2
    return Remedies(fixed, best, lower, runs)
