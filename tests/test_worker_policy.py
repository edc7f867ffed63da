"""The worker's scheduling policy (scheduler/worker_policy.py): its budgets from Settings,
the invariants of its answers (property tests), and the worker and the simulator running
it to the same batches on one arrival trace."""

from __future__ import annotations

import math
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import simulation
from scheduler.planner import PlanItem
from scheduler.simulation import Arrival, Curve, Scaling, WorkerModel
from scheduler.worker_policy import BatchState, WorkerPolicy
from tasks.cli.local_redis import LocalRedis
from tasks.schema import MAX_STEPS
from tasks.settings import Settings
from tasks.text.lengths import STEPS_PER_SECOND, predicted_steps

from .conftest import Request
from .runner_parts import FakeEngine, make_runner

PROPS = settings(derandomize=True, max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def policy_of(**env: str) -> WorkerPolicy:
    return WorkerPolicy.from_settings(Settings.from_env(env))


def test_every_budget_comes_from_the_settings() -> None:
    p = policy_of(TTSPOOL_MAX_BATCH="16", TTSPOOL_MAX_WAIT_MS="100", TTSPOOL_AGING_MS="5000",
                  TTSPOOL_REALTIME_ROWS="3", TTSPOOL_VISIBILITY_TIMEOUT="600")
    assert (p.max_batch, p.token_budget, p.planner.max_wait_s, p.aging_s) == (16, 16 * MAX_STEPS // 2, 0.1, 5.0)
    assert (p.realtime_rows, p.max_rows, p.refill_window_s, p.prefetch, p.tick_s) == (3, 19, 150.0, 32, 0.05)
    # One row: the budget still holds the longest job; the window still holds a batch.
    one = policy_of(TTSPOOL_MAX_BATCH="1", TTSPOOL_MAX_WAIT_MS="0", TTSPOOL_REFILL="0")
    assert (one.token_budget, one.prefetch, one.tick_s, one.max_rows) == (MAX_STEPS, 4, 0.01, 1)
    assert policy_of(TTSPOOL_VISIBILITY_TIMEOUT="86400").refill_window_s == 600.0
    with pytest.raises(ValueError, match="prefetch"):
        replace(p, prefetch=16)


@st.composite
def situations(draw: st.DrawFn) -> tuple[WorkerPolicy, list[PlanItem[int]], float, BatchState]:
    policy = replace(policy_of(TTSPOOL_MAX_BATCH=str(draw(st.integers(1, 12))),
                               TTSPOOL_REALTIME_ROWS=str(draw(st.integers(0, 3)))),
                     refill_window_s=draw(st.sampled_from([5.0, 600.0])))
    now = 100.0
    held = [PlanItem(i, draw(st.integers(1, MAX_STEPS)), draw(st.sampled_from(["realtime", "bulk"])),
                     draw(st.floats(0, now)), draw(st.one_of(st.none(), st.floats(50, 150))),
                     alone=draw(st.booleans()) and draw(st.booleans()))
            for i in range(draw(st.integers(0, 20)))]
    rows = draw(st.integers(1, policy.max_rows))
    state = BatchState(rows=rows, steps=draw(st.integers(rows, rows * MAX_STEPS)), age_s=draw(st.floats(0, 700)),
                       solo=draw(st.booleans()) and draw(st.booleans()), lookup_pending=draw(st.booleans()))
    return policy, held, now, state


@PROPS
@given(situations())
def test_admit_keeps_every_budget_and_drains_only_for_a_reason(
        case: tuple[WorkerPolicy, list[PlanItem[int]], float, BatchState]) -> None:
    policy, held, now, state = case
    got = policy.admit(held, now, state)
    taken = [i.payload for i in got.batch]
    assert len(set(taken)) == len(taken)
    assert not {i.payload for i in got.expired} & set(taken)
    # Expired: exactly those past their deadline, whenever the policy looked at them.
    if got.batch or got.expired:
        assert {i.payload for i in got.expired} == {i.payload for i in held if i.deadline is not None
                                                    and now > i.deadline}
    closed = not policy.refill or state.solo or state.age_s > policy.refill_window_s
    if closed:
        assert got.drain and not got.batch and policy.closed(state) == got.why
        return
    assert policy.closed(state) is None
    assert len(got.batch) <= policy.max_rows - state.rows
    assert not got.batch or sum(i.steps for i in got.batch) <= policy.token_budget - state.steps
    assert not any(i.alone for i in got.batch)
    bulk = [i for i in got.batch if i.priority == "bulk"]
    assert len(bulk) <= (0 if state.lookup_pending else max(0, policy.max_batch - state.rows))
    left = policy.token_budget - state.steps
    chosen = {id(i) for i in [*got.batch, *got.expired]}
    blocked = [i for i in held if id(i) not in chosen and policy.needs_own_batch(i, now, left)]
    assert got.drain == bool(blocked)


@PROPS
@given(situations())
def test_start_is_the_planners_batch_within_the_budgets(
        case: tuple[WorkerPolicy, list[PlanItem[int]], float, BatchState]) -> None:
    policy, held, now, _ = case
    got = policy.start(held, now)
    assert len(got.batch) <= policy.max_batch
    assert len(got.batch) <= 1 or sum(i.steps for i in got.batch) <= policy.token_budget
    if held and not got.batch and not got.expired:
        assert 0 < got.wait_s <= policy.planner.max_wait_s


def test_a_held_job_that_aged_and_does_not_fit_drains_the_batch() -> None:
    policy = policy_of(TTSPOOL_MAX_BATCH="4", TTSPOOL_AGING_MS="1000")
    big = PlanItem("big", MAX_STEPS, arrived=0.0)
    running = BatchState(rows=3, steps=policy.token_budget - 10, age_s=1.0)
    assert not policy.admit([big], 0.5, running).drain  # not aged yet: it waits for a row
    got = policy.admit([big], 2.0, running)
    assert got.drain and not got.batch and "own" in got.why
    assert policy.admit([PlanItem("s", 1, alone=True)], 0.0, replace(running, steps=0)).drain


def _trace(n_bulk: int, n_realtime: int) -> list[Request]:
    """Jobs of distinct lengths, each priority in increasing length: the worker's planner
    anchors a batch on the job it has held longest and the simulator's (which receives
    them all at one instant) on the shortest, so this order makes the two the same."""
    def job(letters: int, priority: str) -> Request:
        text = "".join(chr(ord("a") + (i * 7 + letters) % 26) for i in range(letters))
        return Request(f"job-{uuid.uuid4().hex[:12]}", {"text": text, "priority": priority})

    realtime = [job(4 + 3 * i, "realtime") for i in range(n_realtime)]
    bulk = [job(6 + 5 * i, "bulk") for i in range(n_bulk)]
    return realtime + bulk


def test_the_worker_and_the_simulator_make_the_same_batches(own_broker: LocalRedis, tmp_path: Path) -> None:
    # One arrival trace (every job held at once), one policy, run twice: by the worker's
    # batch function over a fake engine whose rows take their predicted steps, and by the
    # simulator over a curve on which every step takes the same time. Each job must join
    # the running batch after the same number of steps in both.
    engine = FakeEngine(length=lambda req: predicted_steps(req.text, req.speed, req.max_tokens), step_s=0.001)
    runner, _ = make_runner(own_broker, tmp_path / "store", engine=engine, TTSPOOL_MAX_BATCH="4",
                            TTSPOOL_AGING_MS="3600000")
    jobs = _trace(n_bulk=6, n_realtime=2)
    try:
        assert len(jobs) <= runner.policy.prefetch  # the simulated worker holds them all at once too
        out = runner(jobs)
    finally:
        runner.close()
    assert out.finished == {j.id for j in jobs}
    [texts] = engine.batches
    worker = {text: engine.joined[text] for text in texts}

    step_s = 1.0 / STEPS_PER_SECOND  # a curve linear in the rows: one step takes the same time at any size
    model = WorkerModel(Curve(((1, 1.0), (64, 64.0))), runner.policy)
    by_text = {j.kwargs["text"]: j for j in jobs}
    arrivals = [Arrival(0.0, predicted_steps(t), by_text[t].kwargs["priority"]) for t in texts]
    sim = simulation._Simulation(arrivals, model, Scaling.fixed(1), sample_s=1.0, drain_s=3600.0)
    sim.run()
    simulated = {}
    for text, job in zip(texts, sim.jobs):
        assert job.start is not None
        simulated[text] = round(job.start / step_s)
        assert math.isclose(job.start, simulated[text] * step_s, abs_tol=1e-6)
    assert simulated == worker
    # The trace exercised what it is for: refills after the start, the express lane first.
    assert len(set(worker.values())) > 2 and all(worker[j.kwargs["text"]] == 0 for j in jobs[:2])
