"""Property tests of the batch scheduler (scheduler/planner.py): pure, no worker."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.planner import PlanItem, Policy, next_batch, refill

PROPS = settings(derandomize=True, max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Arrival:
    at: float
    steps: int
    priority: str
    ttl: float | None
    alone: bool = False


arrivals = st.lists(
    st.builds(
        Arrival,
        at=st.floats(0, 30, allow_nan=False),
        steps=st.integers(1, 2048),
        priority=st.sampled_from(["realtime", "bulk"]),
        ttl=st.one_of(st.none(), st.floats(0.01, 20, allow_nan=False)),
        alone=st.sampled_from([False] * 9 + [True]),
    ),
    max_size=120,
)
policies = st.builds(
    Policy,
    max_batch=st.integers(1, 32),
    token_budget=st.integers(1, 40_000),
    max_wait_s=st.floats(0, 1, allow_nan=False),
    aging_s=st.floats(0, 10, allow_nan=False),
)


def simulate(jobs: list[Arrival], policy: Policy, seconds_per_step: float) -> None:
    """A worker's life on a simulated clock: jobs arrive, the GPU asks for a batch when
    free, a batch takes time proportional to its longest row. Checks every decision."""
    items = [PlanItem(i, a.steps, a.priority, a.at, None if a.ttl is None else a.at + a.ttl, a.alone)
             for i, a in enumerate(jobs)]
    upcoming = sorted(items, key=lambda it: it.arrived)
    held: list[PlanItem[int]] = []
    ended: dict[int, str] = {}
    now = 0.0
    for _ in range(10 * len(items) + 10):  # bounded: each round ends a job or advances time
        while upcoming and upcoming[0].arrived <= now:
            held.append(upcoming.pop(0))
        if not held and not upcoming:
            break
        d = next_batch(held, now, policy)
        for it in d.expired:
            assert it.deadline is not None and now > it.deadline
            ended[it.payload] = "expired"
        for it in d.batch:
            assert it.deadline is None or now <= it.deadline, "an expired item was batched"
        if d.batch:
            assert len(d.batch) <= policy.max_batch
            assert len(d.batch) == 1 or sum(i.steps for i in d.batch) <= policy.token_budget
            assert len({id(i) for i in d.batch}) == len(d.batch)
            assert len(d.batch) == 1 or not any(i.alone for i in d.batch), "an alone item shared a batch"
            left = [i for i in held if i not in d.batch and i not in d.expired]
            # No un-aged bulk item rides while a realtime item is left behind.
            if any(i.priority == "realtime" for i in left):
                for i in d.batch:
                    assert i.priority == "realtime" or now - i.arrived >= policy.aging_s
            for i in d.batch:
                ended[i.payload] = "batched"
            held = left
            now += max(i.steps for i in d.batch) * seconds_per_step
        else:
            held = [i for i in held if i not in d.expired]
            if held:
                oldest = min(i.arrived for i in held)
                # Waiting for company never exceeds max_wait.
                assert d.wait_s > 0
                assert now - oldest + d.wait_s <= policy.max_wait_s + 1e-9
                step = d.wait_s
            else:
                step = math.inf
            if upcoming:
                step = min(step, upcoming[0].arrived - now)
            now += max(step, 1e-6) if step != math.inf else 0.0
    assert sorted(ended) == list(range(len(items))), "a job neither ran nor ended"


@PROPS
@given(jobs=arrivals, policy=policies, sps=st.sampled_from([0.0, 0.001, 0.01]))
def test_every_job_runs_or_expires_exactly_once_within_limits(jobs: list[Arrival], policy: Policy, sps: float) -> None:
    simulate(jobs, policy, sps)


@PROPS
@given(n_bulk=st.integers(1, 10), aging=st.floats(0.5, 5), max_batch=st.integers(1, 4))
def test_bulk_is_never_starved_by_a_stream_of_realtime(n_bulk: int, aging: float, max_batch: int) -> None:
    """Realtime jobs keep arriving faster than the GPU serves them: bulk still runs, and
    none waits much past the aging bound (plus one batch's and one wait's time)."""
    policy = Policy(max_batch=max_batch, token_budget=100_000, max_wait_s=0.05, aging_s=aging)
    batch_s = 0.1
    held = [PlanItem(("bulk", i), 100, "bulk", 0.0) for i in range(n_bulk)]
    now, served = 0.0, {}
    for k in range(100_000):
        held.append(PlanItem(("rt", k), 100, "realtime", now))
        held.append(PlanItem(("rt", k, 2), 100, "realtime", now))
        d = next_batch(held, now, policy)
        for it in d.batch:
            if it.payload[0] == "bulk":
                served[it.payload] = now
        held = [i for i in held if i not in d.batch]
        now += batch_s if d.batch else d.wait_s
        if len(served) == n_bulk:
            break
    assert len(served) == n_bulk
    bound = aging + batch_s * math.ceil(n_bulk / max_batch) + policy.max_wait_s + batch_s
    assert max(served.values()) <= bound


def test_realtime_first_then_similar_lengths() -> None:
    policy = Policy(max_batch=3, token_budget=10_000, max_wait_s=0.0, aging_s=100)
    items = [PlanItem("bulk-old", 100, "bulk", 0.0), PlanItem("rt-long", 1000, "realtime", 1.0),
             PlanItem("rt-short", 90, "realtime", 1.5), PlanItem("rt-mid", 900, "realtime", 2.0),
             PlanItem("rt-longer", 1100, "realtime", 2.5)]
    d = next_batch(items, now=3.0, policy=policy)
    # Built around the oldest realtime item, with the two closest to it in length.
    assert {i.payload for i in d.batch} == {"rt-long", "rt-mid", "rt-longer"}


def test_aged_bulk_ranks_with_realtime() -> None:
    policy = Policy(max_batch=1, token_budget=10_000, max_wait_s=0.0, aging_s=5)
    items = [PlanItem("bulk", 100, "bulk", 0.0), PlanItem("rt", 100, "realtime", 4.0)]
    assert next_batch(items, now=4.5, policy=policy).batch[0].payload == "rt"
    assert next_batch(items, now=5.0, policy=policy).batch[0].payload == "bulk"


def test_waits_for_company_until_max_wait() -> None:
    policy = Policy(max_batch=4, token_budget=10_000, max_wait_s=0.2, aging_s=10)
    items = [PlanItem("a", 100, "bulk", 1.0)]
    d = next_batch(items, now=1.05, policy=policy)
    assert d.batch == [] and d.wait_s == pytest.approx(0.15)
    assert [i.payload for i in next_batch(items, now=1.25, policy=policy).batch] == ["a"]
    full = [PlanItem(k, 100, "bulk", 1.0) for k in range(4)]
    assert len(next_batch(full, now=1.0, policy=policy).batch) == 4  # full: no wait


def test_oversized_item_runs_alone_and_expired_items_never_run() -> None:
    policy = Policy(max_batch=8, token_budget=100, max_wait_s=0.0)
    items = [PlanItem("big", 500, "bulk", 0.0), PlanItem("late", 10, "bulk", 0.0, deadline=0.5),
             PlanItem("small", 20, "bulk", 1.0)]
    d = next_batch(items, now=1.0, policy=policy)
    assert [i.payload for i in d.batch] == ["big"]
    assert [i.payload for i in d.expired] == ["late"]
    assert next_batch([], now=0.0, policy=policy).batch == []


def test_alone_items_run_by_themselves_in_their_turn() -> None:
    policy = Policy(max_batch=8, token_budget=10_000, max_wait_s=1.0)
    items = [PlanItem("a", 100, "bulk", 1.0), PlanItem("suspect", 100, "bulk", 2.0, alone=True),
             PlanItem("b", 100, "bulk", 3.0)]
    # The suspect is not the oldest: the others go first, at once (no waiting for it).
    assert [i.payload for i in next_batch(items, 3.0, policy).batch] == ["a", "b"]
    assert [i.payload for i in next_batch(items[1:2], 3.0, policy).batch] == ["suspect"]
    older = [PlanItem("suspect", 100, "bulk", 0.0, alone=True), *items[::2]]
    assert [i.payload for i in next_batch(older, 3.0, policy).batch] == ["suspect"]


@pytest.mark.parametrize("kwargs", [dict(max_batch=0, token_budget=100), dict(max_batch=4, token_budget=0),
                                    dict(max_batch=4, token_budget=10, max_wait_s=-1)])
def test_policy_rejects_bad_limits(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Policy(**kwargs)


@PROPS
@given(arrivals, policies, st.integers(0, 32), st.integers(0, 40_000), st.floats(0, 40, allow_nan=False),
       st.integers(0, 4))
def test_refill_takes_what_fits_in_planner_order(jobs: list[Arrival], policy: Policy, rows: int, steps: int,
                                                  now: float, reserved: int) -> None:
    items = [PlanItem(i, a.steps, a.priority, a.at, None if a.ttl is None else a.at + a.ttl, a.alone)
             for i, a in enumerate(jobs) if a.at <= now]
    d = refill(items, now, policy, rows, steps, reserved)
    assert sum(i.priority != "realtime" for i in d.batch) <= max(0, rows - reserved)
    chosen = {i.payload for i in d.batch}
    assert {i.payload for i in d.expired} == {i.payload for i in items if i.deadline is not None and now > i.deadline}
    assert not chosen & {i.payload for i in d.expired}
    assert len(d.batch) <= rows and sum(i.steps for i in d.batch) <= steps
    assert not any(i.alone for i in d.batch)
    assert d.wait_s == 0.0
    left = [i for i in items if i.payload not in chosen and i not in d.expired and not i.alone]
    if any(i.steps <= steps and (i.priority == "realtime" or rows > reserved) for i in left) and rows > 0:
        assert d.batch, "something fits, yet the free rows stay empty"
    # A waiting realtime (or aged) item that would fit is never passed over for un-aged bulk.
    if any(i for i in left if i.steps <= steps - sum(b.steps for b in d.batch) and rank_of(i, now, policy) == 0):
        assert all(rank_of(b, now, policy) == 0 for b in d.batch) or len(d.batch) == rows


def rank_of(item: PlanItem[int], now: float, policy: Policy) -> int:
    return 0 if item.priority == "realtime" or now - item.arrived >= policy.aging_s else 1


def test_refill_puts_a_realtime_job_ahead_of_the_bulk_backlog() -> None:
    policy = Policy(max_batch=8, token_budget=4000, max_wait_s=0.5, aging_s=60)
    bulk = [PlanItem(f"bulk{i}", 900, "bulk", float(i)) for i in range(4)]
    items = [*bulk, PlanItem("rt", 100, "realtime", 3.5), PlanItem("suspect", 50, "realtime", 0.0, alone=True)]
    assert [i.payload for i in refill(items, 4.0, policy, rows=1, steps=1000).batch] == ["rt"]
    assert [i.payload for i in refill(items, 4.0, policy, rows=3, steps=999).batch] == ["rt"]
    assert [i.payload for i in refill(items, 4.0, policy, rows=3, steps=1000).batch] == ["rt", "bulk0"]
    assert refill(items, 4.0, policy, rows=0, steps=2000).batch == []
    # Rows kept for realtime: bulk may not take them, a realtime job may.
    assert [i.payload for i in refill(items, 4.0, policy, rows=1, steps=2000, reserved=1).batch] == ["rt"]
    assert refill(bulk, 4.0, policy, rows=2, steps=2000, reserved=2).batch == []
    assert [i.payload for i in refill(bulk, 4.0, policy, rows=2, steps=2000, reserved=1).batch] == ["bulk0"]
