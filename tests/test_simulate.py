"""The capacity simulator (scheduler/simulation.py, `ttspool simulate`): pure, no Redis,
no worker. Its agreement with a real worker is `ttspool simulate --check-against-worker`."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.profile import Profile, arrivals
import scheduler.simulation as simulation
from scheduler.simulation import BULK, REALTIME, Arrival, Curve, Scaling, WorkerModel, simulate, smallest_fleet
from scheduler.worker_policy import WorkerPolicy
from tasks.settings import Settings
from tasks.cli import main
from tasks.cli import simulate as simulate_cli
from tasks.cli.simulate import TARGET_MISSED
from tasks.errors import UsageError
from tasks.text.frontend import FrontEnd
from tasks.text.lengths import STEPS_PER_SECOND, predicted_steps

from .conftest import run_cli

PROPS = settings(derandomize=True, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A GPU-like curve: ten times the throughput at 32 rows as at one.
CURVE = Curve(((1, 1.0), (8, 5.0), (32, 10.0)))


def worker_policy(max_batch: int, max_wait_ms: int, aging_ms: int, **overrides: Any) -> WorkerPolicy:
    """The policy of a worker configured with these settings (and the rest at defaults)."""
    settings = Settings.from_env({"TTSPOOL_MAX_BATCH": str(max_batch), "TTSPOOL_MAX_WAIT_MS": str(max_wait_ms),
                                  "TTSPOOL_AGING_MS": str(aging_ms)})
    return replace(WorkerPolicy.from_settings(settings), **overrides)


MODEL = WorkerModel(CURVE, worker_policy(max_batch=16, max_wait_ms=100, aging_ms=10_000))


def steady(rate_per_s: float, seconds: float, steps: int = 470, realtime_every: int = 0,
           ttl_s: float | None = None) -> list[Arrival]:
    """Evenly spaced arrivals; every `realtime_every`-th one realtime."""
    n = int(rate_per_s * seconds)
    return [Arrival(i / rate_per_s, steps, REALTIME if realtime_every and i % realtime_every == 0 else BULK, ttl_s)
            for i in range(n)]


def test_lone_jobs_wait_only_for_company() -> None:
    jobs = [Arrival(60.0 * i, 200, REALTIME if i % 2 else BULK) for i in range(20)]
    report = simulate(jobs, MODEL, Scaling.fixed(1))
    for w in report.waits.values():
        assert w.started == 10 and w.expired == w.unstarted == 0
        # An idle worker waits max_wait for batch-mates, nothing more.
        assert w.max_s is not None and w.max_s <= MODEL.policy.planner.max_wait_s + 1e-3


def test_a_backlog_drains_at_the_curves_throughput() -> None:
    # 64 jobs of 10 s of audio at once, 16 rows (refill keeps them full): the fleet's
    # audio seconds over the curve's throughput at 16 rows.
    jobs = [Arrival(0.0, round(10 * STEPS_PER_SECOND), BULK) for _ in range(64)]
    report = simulate(jobs, MODEL, Scaling.fixed(1))
    expected = 64 * 10 / CURVE.audio_s_per_s(16)
    assert report.end_s == pytest.approx(expected, rel=0.02)
    assert report.mean_rows == pytest.approx(16, rel=0.02)


def test_arrivals_above_capacity_grow_the_queue() -> None:
    # One worker serves about 6.7 audio s/s at 16 rows; 1 job of 10 s a second is 10.
    jobs = steady(1.0, 1800, steps=round(10 * STEPS_PER_SECOND))
    report = simulate(jobs, MODEL, Scaling.fixed(1), sample_s=60)
    waiting = [s.queued + s.held for s in report.timeline if s.t <= 1800]
    assert waiting[-1] > waiting[len(waiting) // 2] > waiting[2]
    assert report.waits[BULK].p99_s is not None and report.waits[BULK].p99_s > 300
    assert report.utilization > 0.95


def test_realtime_waits_less_than_bulk_under_load() -> None:
    jobs = steady(0.9, 1800, steps=round(8 * STEPS_PER_SECOND), realtime_every=5)
    report = simulate(jobs, MODEL, Scaling.fixed(1))
    rt, bulk = report.waits[REALTIME], report.waits[BULK]
    assert rt.p99_s is not None and bulk.p99_s is not None and bulk.mean_s is not None and rt.mean_s is not None
    assert rt.p99_s <= bulk.p99_s and rt.mean_s < bulk.mean_s / 10


def test_a_realtime_job_joins_a_full_bulk_batch_at_once_with_refill() -> None:
    # 16 rows of 1000 steps: within the token budget (16 x 2048 / 2), nothing else held.
    long_bulk = [Arrival(0.0, 1000, BULK) for _ in range(16)]
    late = [Arrival(30.0, 100, REALTIME)]
    with_refill = simulate(long_bulk + late, MODEL, Scaling.fixed(1))
    assert with_refill.waits[REALTIME].max_s == pytest.approx(0.0, abs=1e-3)
    # Without refill it waits for the whole bulk batch: 1000 steps at 16 rows.
    static = simulate(long_bulk + late, replace(MODEL, policy=replace(MODEL.policy, refill=False)), Scaling.fixed(1))
    batch_s = 1000 * CURVE.step_s(16)
    assert static.waits[REALTIME].max_s == pytest.approx(batch_s - 30.0, rel=0.01)


def test_tight_deadlines_expire_jobs_that_would_wait() -> None:
    jobs = steady(1.0, 1200, steps=round(10 * STEPS_PER_SECOND), ttl_s=30.0)
    report = simulate(jobs, MODEL, Scaling.fixed(1))
    w = report.waits[BULK]
    assert w.expired > 0 and w.started + w.expired + w.unstarted == w.jobs == len(jobs)
    assert w.max_s == math.inf and w.mean_s is not None and w.mean_s <= 30.0 + 1e-6
    relaxed = simulate([replace(a, ttl_s=None) for a in jobs], MODEL, Scaling.fixed(1))
    assert relaxed.waits[BULK].expired == 0


def test_the_autoscaler_adds_workers_after_the_reaction_and_load_time() -> None:
    scaling = Scaling(min_workers=1, max_workers=4, target=8, poll_s=15, reaction_s=30, load_s=60)
    # A burst of 10 minutes, then a trickle for an hour.
    burst = steady(3.0, 600, steps=round(10 * STEPS_PER_SECOND))
    jobs = burst + [Arrival(600.0 + 60 * i, 200) for i in range(60)]
    report = simulate(jobs, MODEL, scaling, sample_s=1.0)
    first_paid = next(s.t for s in report.timeline if s.workers > 1)
    first_ready = next(s.t for s in report.timeline if s.ready > 1)
    assert first_paid >= scaling.poll_s
    assert first_ready - first_paid >= scaling.reaction_s + scaling.load_s - 1
    assert report.peak_workers == 4
    # Scaling down after the load: one worker at a time, no faster than the period.
    downs = [b.t for a, b in zip(report.timeline, report.timeline[1:]) if b.workers < a.workers]
    assert downs and all(b - a >= scaling.down_period_s - 1 for a, b in zip(downs, downs[1:]))
    assert report.gpu_hours < 4 * report.end_s / 3600


def test_a_fixed_fleet_pays_for_every_worker_all_along() -> None:
    report = simulate(steady(0.2, 3600), MODEL, Scaling.fixed(3))
    assert report.gpu_hours == pytest.approx(3 * report.end_s / 3600)
    assert 0 < report.busy_hours <= report.gpu_hours


def test_target_search_finds_the_smallest_fleet() -> None:
    jobs = arrivals(Profile(duration_s=5400, base_per_h=2000, peak_per_h=8000, peaks=((1800, 3600),)), seed=3)

    def run(s: Scaling) -> simulation.Report:
        return simulate(jobs, MODEL, s)

    found = smallest_fleet(run, Scaling.fixed(1), realtime_p99_s=5.0, bulk_p99_s=120.0)
    assert found.workers > 1 and found.report.meets(5.0, 120.0)
    assert found.fewer is not None and not found.fewer.meets(5.0, 120.0)
    assert not run(Scaling.fixed(found.workers - 1)).meets(5.0, 120.0)


def test_target_search_stops_at_a_max_the_autoscaler_never_reaches_and_finds_what_meets_it() -> None:
    jobs = steady(3.0, 600, steps=round(10 * STEPS_PER_SECOND))
    lazy = Scaling(min_workers=1, max_workers=8, target=10_000)  # never sees enough waiting

    def run(s: Scaling) -> simulation.Report:
        return simulate(jobs, MODEL, s)

    missed = smallest_fleet(run, lazy, realtime_p99_s=None, bulk_p99_s=150.0)
    assert not missed.met and missed.missed == simulation.MISSED_AUTOSCALER
    assert missed.report.peak_replicas < missed.workers and not missed.report.meets(None, 150.0)
    fixes = simulation.remedies(run, missed, realtime_p99_s=None, bulk_p99_s=150.0)
    assert fixes.fixed is not None and fixes.fixed.report.meets(None, 150.0) and fixes.fixed.scaling.is_fixed
    assert not run(Scaling.fixed(fixes.fixed.workers - 1)).meets(None, 150.0)
    found = fixes.min_workers
    assert found is not None and found.report.meets(None, 150.0) and not found.scaling.is_fixed
    assert lazy.min_workers < found.scaling.min_workers <= fixes.fixed.workers
    # Its peak is the max it needs: the run with that max is the same run.
    same = run(replace(found.scaling, max_workers=found.report.peak_replicas))
    assert same.to_dict() == found.report.to_dict()
    # The target (10,000 waiting per worker) halved down to 1: some halving lets KEDA keep up.
    lower = fixes.keda_target
    assert lower is not None and lower.scaling.target < lazy.target and lower.report.meets(None, 150.0)


def test_target_search_stops_when_more_workers_cannot_lower_the_wait() -> None:
    # Sparse jobs: every one is taken by an idle worker at once and waits max_wait for
    # company; no fleet brings that below 0.1 s.
    jobs = [Arrival(30.0 * i, 200, REALTIME) for i in range(40)]
    missed = smallest_fleet(lambda s: simulate(jobs, MODEL, s), Scaling.fixed(1), realtime_p99_s=0.01)
    assert not missed.met and missed.missed == simulation.MISSED_PLATEAU and missed.runs <= 3
    assert missed.report.max_queued == 0


def test_the_same_seed_gives_the_same_report() -> None:
    profile = Profile(duration_s=2 * 3600, peaks=((1800, 3600),))
    a = simulate(arrivals(profile, seed=7), MODEL, Scaling(1, 4))
    b = simulate(arrivals(profile, seed=7), MODEL, Scaling(1, 4))
    assert a.to_dict() == b.to_dict()
    assert arrivals(profile, seed=8) != arrivals(profile, seed=7)


def test_the_worker_policy_makes_every_batching_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"start": 0, "admit": 0}
    for name in calls:
        real = getattr(WorkerPolicy, name)

        def spy(*args: object, _real: object = real, _name: str = name, **kwargs: object) -> object:
            calls[_name] += 1
            return _real(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(WorkerPolicy, name, spy)
    simulate(steady(1.0, 300, realtime_every=3), MODEL, Scaling.fixed(1))
    assert calls["start"] > 0 and calls["admit"] > 0


def test_curve_interpolates_and_reads_bench_json() -> None:
    assert CURVE.audio_s_per_s(1) == 1.0 and CURVE.audio_s_per_s(64) == 10.0
    assert CURVE.audio_s_per_s(20) == pytest.approx(7.5)
    assert Curve(((8, 4.0),)).audio_s_per_s(2) == pytest.approx(1.0)  # through zero below the smallest size
    bench = {"runs": [{"batch_size": 1, "mode": "drop", "audio_s_per_s": 0.5},
                      {"batch_size": 8, "mode": "drop", "audio_s_per_s": 2.0},
                      {"batch_size": 8, "mode": "refill", "audio_s_per_s": 3.0}]}
    assert Curve.from_bench(bench).points == ((1, 0.5), (8, 2.0))
    assert Curve.parse("8:2,1:0.5").points == ((1, 0.5), (8, 2.0))
    for bad in ("", "1:0", "x:1", "1:2,1:3"):
        with pytest.raises(ValueError):
            Curve.parse(bad)


def test_curve_scale_recovers_how_much_slower_a_worker_was() -> None:
    # Below capacity at the curve's own speed, a backlog at 0.7x of it.
    jobs = steady(0.5, 1200, steps=round(10 * STEPS_PER_SECOND))
    slower = replace(MODEL, curve=Curve(tuple((b, v * 0.7) for b, v in CURVE.points)))
    wait = simulation.mean_wait(simulate(jobs, slower, Scaling.fixed(1)))
    assert wait is not None and wait > 1.0
    scale = simulation.curve_scale_for(jobs, MODEL, Scaling.fixed(1), wait)
    assert scale == pytest.approx(0.7, rel=0.02)
    assert simulation.curve_scale_for(jobs, MODEL, Scaling.fixed(1), 1e9) is None


def test_the_worker_check_compares_mean_waits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from tasks.cli.simulate_check import _compare, _sizes
    from tasks.settings import QUEUE_BULK, QUEUE_REALTIME

    assert _sizes(18) == [1, 2, 4, 8, 16, 18] and _sizes(1) == [1]
    real = {QUEUE_REALTIME: (10 * 0.5, 10), QUEUE_BULK: (30 * 4.0, 30)}  # (sum of waits, jobs)
    sim = {QUEUE_REALTIME: simulation.Waits.of([0.4] * 10, 0, 0), QUEUE_BULK: simulation.Waits.of([4.6] * 30, 0, 0)}
    args = argparse.Namespace(minutes=2.0, load=0.8, model=None, json_out=tmp_path / "check.json")
    assert _compare(real, sim, CURVE, 0.97, 40, args) == 0
    out = capsys.readouterr().out
    assert "agree within 25%" in out and "0.97x" in out
    result = json.loads(args.json_out.read_text())
    assert result["waits"]["all"]["real_mean_s"] == pytest.approx(3.125)
    assert result["waits"]["all"]["ratio"] == pytest.approx(3.55 / 3.125)
    sim[QUEUE_BULK] = simulation.Waits.of([1.0] * 30, 0, 0)
    assert _compare(real, sim, CURVE, None, 40, args) == 1
    assert "DISAGREE" in capsys.readouterr().out


def test_the_worker_check_simulates_what_was_replayed(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # The check's glue, with the engine, Redis and the worker replaced by their results.
    import tasks.cli.simulate_check as check
    from tasks.settings import QUEUE_BULK, QUEUE_REALTIME

    texts = {"realtime": ["Yes."], "bulk": ["A longer text for a bulk job."]}
    steps = {"Yes.": 40, "A longer text for a bulk job.": 400}
    monkeypatch.setattr(check, "_pools", lambda: {p: [type("Req", (), {"text": t, "voice": 2})() for t in ts]
                                                  for p, ts in texts.items()})
    monkeypatch.setattr(check, "_measure", lambda settings, console, pools, model_for, args: (CURVE, steps))

    def replay(settings: object, jobs: list[dict[str, object]], times: list[float], console: object,
               args: object) -> tuple[dict[str, tuple[float, int]], list[float]]:
        n = {q: sum(1 for j in jobs if j["priority"] == p) for q, p in ((QUEUE_REALTIME, "realtime"), (QUEUE_BULK, "bulk"))}
        return {q: (0.2 * k, k) for q, k in n.items()}, times

    monkeypatch.setattr(check, "_replay", replay)
    code = main(["simulate", "--check-against-worker", "--minutes", "2", "--load", "0.5"])
    out = capsys.readouterr().out
    assert code in (0, 1) and "simulated / real" in out and "tts.realtime" in out


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[Arrival], WorkerModel, Scaling]:
    jobs = draw(st.lists(st.builds(
        Arrival, t=st.floats(0, 600, allow_nan=False), steps=st.integers(1, 2048),
        priority=st.sampled_from([REALTIME, BULK]),
        ttl_s=st.one_of(st.none(), st.floats(0.5, 300, allow_nan=False))), max_size=80))
    model = WorkerModel(CURVE, worker_policy(draw(st.integers(1, 32)), draw(st.integers(0, 500)),
                                             draw(st.integers(0, 30_000)), realtime_rows=draw(st.integers(0, 4)),
                                             refill=draw(st.booleans()),
                                             refill_window_s=draw(st.sampled_from([5.0, 600.0]))))
    low = draw(st.integers(0, 3))
    scaling = Scaling(low, low + draw(st.integers(0, 3)) or 1, target=draw(st.sampled_from([1.0, 8.0, 64.0])),
                      reaction_s=draw(st.floats(0, 60)), load_s=draw(st.floats(0, 120)))
    return jobs, model, scaling


@PROPS
@given(workloads())
def test_every_job_is_accounted_for_once(work: tuple[list[Arrival], WorkerModel, Scaling]) -> None:
    jobs, model, scaling = work
    report = simulate(jobs, model, scaling, sample_s=5.0)
    total = 0
    for prio, w in report.waits.items():
        mine = [a for a in jobs if a.priority == prio]
        assert w.jobs == len(mine) == w.started + w.expired + w.unstarted
        total += w.jobs
        if w.started:
            assert w.mean_s is not None and w.mean_s >= 0 and w.p50_s is not None and w.p50_s >= 0
        if w.expired:
            deadlines = [a.ttl_s for a in mine if a.ttl_s is not None]
            assert deadlines
    assert total == len(jobs)
    # Every job ran or expired: the drain limit (an hour) is far beyond this much work.
    assert all(w.unstarted == 0 for w in report.waits.values())
    assert report.busy_hours <= report.gpu_hours + 1e-9
    assert all(s.workers <= scaling.max_workers for s in report.timeline)


# -- the command -----------------------------------------------------------------------


def test_arrivals_file_takes_submit_lines_with_a_time(tmp_path: Path) -> None:
    from tasks.cli.simulate_arrivals import load_arrivals

    path = tmp_path / "arrivals.jsonl"
    lines = [
        {"enqueued_at": 1_764_583_210.0, "text": "Chapter one. It was a dark night.", "voice": 3},
        {"enqueued_at": 1_764_583_200.0, "audio_s": 2.0, "priority": "realtime", "ttl_s": 30},
        {"enqueued_at": 1_764_583_205.0, "steps": 300, "expires_at": 1_764_583_215.0},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    got = load_arrivals(path, FrontEnd())
    assert [a.t for a in got] == [0.0, 5.0, 10.0]
    assert got[0] == Arrival(0.0, math.ceil(2.0 * STEPS_PER_SECOND), REALTIME, 30.0)
    assert got[1] == Arrival(5.0, 300, BULK, 10.0)
    assert got[2].steps == predicted_steps("Chapter one. It was a dark night.")

    for bad, why in (({"text": "No time."}, "t .* or enqueued_at"), ({"t": 1, "steps": 0}, "1-2048"),
                     ({"t": 1, "text": "x", "speed": 12}, "speed"), ({"t": 1, "steps": 5, "expires_at": 9}, "needs enqueued_at")):
        path.write_text(json.dumps({"t": 0, "steps": 1}) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(UsageError, match=f"arrivals.jsonl:2: .*{why}"):
            load_arrivals(path, FrontEnd())


def test_the_command_prints_writes_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    code = main(["simulate", "--curve", "1:1,8:5,32:10", "--hours", "2", "--peaks", "0.5-1", "--base-rate", "1000",
                 "--peak-rate", "6000", "--autoscale", "--max-workers", "4", "--keda-target", "16",
                 "--json-out", str(out), "--plot", str(png)])
    assert code == 0
    text = capsys.readouterr().out
    assert "realtime" in text and "GPU-hours" in text
    result = json.loads(out.read_text())
    assert result["report"]["waits"]["bulk"]["jobs"] + result["report"]["waits"]["realtime"]["jobs"] == result["jobs"]
    assert result["scaling"]["max_workers"] == 4 and len(result["report"]["timeline"]["t"]) > 100
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_searches_a_fleet(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--curve", "1:1,8:5,32:10", "--hours", "1", "--peaks", "0-0.5", "--base-rate", "1000",
                 "--peak-rate", "4000", "--target-p99", "5", "--target-p99-bulk", "120"])
    assert code == 0
    assert "smallest fleet with realtime p99 <= 5 s and bulk p99 <= 120 s:" in capsys.readouterr().out


# An hour with a quarter-hour burst that KEDA (64 waiting per worker, 90 s to serve)
# meets too late for a 5 s realtime p99; ten warm workers meet it.
BURST = ("simulate", "--curve", "1:1,8:5,32:10", "--hours", "1", "--peaks", "0.25-0.5", "--base-rate", "500",
         "--peak-rate", "6000")


def test_a_missed_target_prints_the_table_why_and_what_meets_it(tmp_path: Path) -> None:
    png, out = tmp_path / "day.png", tmp_path / "day.json"
    proc = run_cli(dict(os.environ), *BURST, "--autoscale", "--target-p99", "5", "--plot", str(png),
                   "--json-out", str(out), timeout=120)
    assert proc.returncode == TARGET_MISSED == 3, proc.stderr
    text = proc.stdout
    assert "queue wait" in text and "│ realtime │" in text and "GPU-hours" in text  # the table
    assert "target missed: realtime p99 <= 5 s" in text
    result = json.loads(out.read_text())
    search, reached = result["search"], result["report"]
    assert search["met"] is False and search["missed"] == "autoscaler"
    # Why: the p99 it reached and the workers it left unused.
    assert f"p99 realtime {reached['waits']['realtime']['p99_s']:.2f} s" in text
    assert f"it used at most {reached['peak_replicas']} of its {search['workers']} workers" in text
    # What meets it: a fixed fleet and a KEDA floor, each checked by its own run.
    fixed, floor = search["remedies"]["fixed"], search["remedies"]["min_workers"]
    assert fixed["p99_s"]["realtime"] <= 5 and floor["p99_s"]["realtime"] <= 5
    assert f"--workers {fixed['scaling']['max_workers']} without --autoscale" in text
    assert f"--min-workers {floor['scaling']['min_workers']} --max-workers {floor['peak_replicas']}" in text
    assert f"--target-p99 {math.ceil(reached['waits']['realtime']['p99_s'] * 100) / 100:g}" in text
    assert "exit status 3" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_min_workers_is_honoured_with_autoscale(tmp_path: Path) -> None:
    out = tmp_path / "day.json"
    proc = run_cli(dict(os.environ), *BURST, "--autoscale", "--min-workers", "8", "--keda-target", "16",
                   "--json-out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["scaling"]["min_workers"] == 8 and result["scaling"]["autoscale"] is True
    assert result["scaling"]["max_workers"] == 8  # the default max rises to the min
    assert "KEDA 8-8 workers" in proc.stdout
    assert min(result["report"]["timeline"]["workers"]) >= 8
    # The search keeps the floor: it searches --max-workers from 8 up, never a fixed fleet.
    proc = run_cli(dict(os.environ), *BURST, "--autoscale", "--min-workers", "8", "--keda-target", "16",
                   "--target-p99", "5", "--json-out", str(out), timeout=120)
    result = json.loads(out.read_text())
    assert result["scaling"]["min_workers"] == 8 and result["scaling"]["autoscale"] is True
    assert result["search"]["workers"] >= 8 and min(result["report"]["timeline"]["workers"]) >= 8
    assert proc.returncode == (0 if result["search"]["met"] else TARGET_MISSED), proc.stderr


def test_fleet_flags_that_contradict_are_refused() -> None:
    for flags, why in ((("--min-workers", "3"), "add --autoscale"), (("--autoscale", "--workers", "3"), "fixed fleet"),
                       (("--autoscale", "--min-workers", "6", "--max-workers", "4"), "more than --max-workers 4")):
        proc = run_cli(dict(os.environ), *BURST, *flags, timeout=120)
        assert proc.returncode == 2 and why in proc.stderr, (flags, proc.stderr)


def test_the_fixed_fleet_plot_shows_the_fleet_found(tmp_path: Path) -> None:
    out = tmp_path / "day.json"
    proc = run_cli(dict(os.environ), *BURST, "--target-p99", "5", "--json-out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    n = result["search"]["workers"]
    # The table and the JSON are the fleet found, not the one worker the search starts from.
    assert n > 1 and result["scaling"]["max_workers"] == n and f", {n} workers;" in proc.stdout
    assert set(result["report"]["timeline"]["workers"]) == {n}

    jobs = arrivals(Profile(duration_s=3600, base_per_h=500, peak_per_h=6000, peaks=((900, 1800),)), seed=0)
    model = WorkerModel(Curve.parse("1:1,8:5,32:10"), WorkerPolicy.from_settings(Settings.from_env({})))
    found = smallest_fleet(lambda sc: simulate(jobs, model, sc), Scaling.fixed(1), realtime_p99_s=5.0)
    assert found.workers == n
    fig = simulate_cli.chart(found.report, found.scaling, "the smallest fleet with realtime p99 <= 5 s")
    try:
        top, bottom = fig.axes
        assert top.get_title().startswith(f"{n} workers\n") and "never s" not in top.get_title()
        low, high = bottom.get_ylim()
        assert low == 0 and n < high <= 2 * n
        assert all(set(line.get_ydata()) == {n} for line in bottom.get_lines())
    finally:
        plt.close(fig)


def test_a_wait_that_never_ends_is_named_in_the_plot_title() -> None:
    jobs = steady(1.0, 1200, steps=round(10 * STEPS_PER_SECOND), ttl_s=30.0)  # far past one worker
    report = simulate(jobs, MODEL, Scaling.fixed(1))
    fig = simulate_cli.chart(report, Scaling.fixed(1))
    try:
        title = fig.axes[0].get_title()
        assert "1 worker\n" in title and "never s" not in title
        share = report.waits[BULK].expired / report.waits[BULK].jobs
        assert f"bulk never ({share:.0%} of jobs did not run)" in title
        assert fig.axes[1].get_ylim()[0] == 0 and 1 < fig.axes[1].get_ylim()[1] < 3
    finally:
        plt.close(fig)


def test_the_command_needs_a_curve(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--hours", "1"]) == 2
    assert "--bench FILE" in capsys.readouterr().err
