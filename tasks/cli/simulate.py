"""`ttspool simulate`: capacity planning by simulation (scheduler/simulation.py).

A profile of arrivals (from flags, or real submissions in a JSONL file) against N
workers, each as fast as `ttspool bench --json-out` measured, batching with the real
planner, optionally scaled by KEDA: queue waits per priority, expired jobs, utilization,
GPU-hours; `--target-p99` finds the smallest fleet that meets a wait target, or says why
none it tried does and what would (exit status 3, the table and plot still written). With
`--check-against-worker` it checks itself against a real worker on this machine
(tasks/cli/simulate_check.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..settings import Settings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from scheduler.simulation import Arrival, Remedies, Report, Scaling, Search, Waits, WorkerModel


TARGET_MISSED = 3  # exit status: no fleet the search tried met the p99 target (the answer is still printed)


def _peaks(raw: str) -> list[tuple[float, float]]:
    """"9-12,14-17" (hours of the day, fractions allowed) -> [(start_s, end_s), ...]."""
    out = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            start, end = (float(x) * 3600 for x in part.split("-"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--peaks are hour spans like 9-12,14-17.5, got {raw!r}") from None
        out.append((start, end))
    return out


def add_commands(sub: Any) -> None:
    p = sub.add_parser("simulate", help="capacity planning: an arrival profile against simulated workers")
    curve = p.add_argument_group("worker speed (one of)")
    curve.add_argument("--bench", type=Path, metavar="JSON", help="a `ttspool bench --json-out` file")
    curve.add_argument("--curve", metavar="B:AUDIO_S_PER_S,...", help="the same numbers inline, e.g. 1:0.9,8:4.1,32:7.5")

    prof = p.add_argument_group("arrivals: real submissions, or a profile from these flags")
    prof.add_argument("--arrivals", type=Path, metavar="JSONL",
                      help="one submission a line, with t or enqueued_at (tasks/cli/simulate_arrivals.py)")
    prof.add_argument("--hours", type=float, default=24.0, help="profile length (default 24)")
    prof.add_argument("--base-rate", type=float, default=600.0, help="jobs per hour outside peaks (default 600)")
    prof.add_argument("--peak-rate", type=float, default=3000.0, help="jobs per hour in peaks (default 3000)")
    prof.add_argument("--peaks", type=_peaks, default=_peaks("9-12,14-17"),
                      help="peak hours of the day (default 9-12,14-17)")
    prof.add_argument("--realtime-fraction", type=float, default=0.3, help="share of realtime jobs (default 0.3)")
    prof.add_argument("--realtime-audio-s", type=float, default=4.0, help="median audio s of a realtime job (default 4)")
    prof.add_argument("--bulk-audio-s", type=float, default=15.0, help="median audio s of a bulk job (default 15)")
    prof.add_argument("--length-sigma", type=float, default=0.5, help="log-normal spread of lengths (default 0.5)")
    prof.add_argument("--realtime-ttl-s", type=float, help="realtime deadline from enqueue (default none)")
    prof.add_argument("--bulk-ttl-s", type=float, help="bulk deadline from enqueue (default none)")
    prof.add_argument("--seed", type=int, default=0, help="the profile's random draws (default 0)")

    fleet = p.add_argument_group("fleet")
    fleet.add_argument("--workers", type=int, help="a fixed fleet of this many warm workers (default 1)")
    fleet.add_argument("--autoscale", action="store_true",
                       help="KEDA on queue depth instead, as deploy/k8s/keda.yaml sets it up")
    fleet.add_argument("--min-workers", type=int, help="with --autoscale (default 1, as keda.yaml)")
    fleet.add_argument("--max-workers", type=int,
                       help="with --autoscale (default 8, as keda.yaml, or --min-workers if more; "
                            "with --target-p99 the search starts at --min-workers)")
    fleet.add_argument("--keda-target", type=float, default=64.0,
                       help="jobs waiting in Redis per worker (scalingModifiers.target, default 64)")
    fleet.add_argument("--poll-s", type=float, default=15.0, help="KEDA pollingInterval (default 15)")
    fleet.add_argument("--reaction-s", type=float, default=30.0,
                       help="scale decision to a running pod: scheduling, image, start (default 30)")
    fleet.add_argument("--load-s", type=float, default=60.0, help="model load before a new worker serves (default 60)")
    fleet.add_argument("--scale-down-window-s", type=float, default=300.0,
                       help="scale down to the most workers wanted over this window (default 300)")
    fleet.add_argument("--scale-down-period-s", type=float, default=180.0,
                       help="at most one worker removed per this period (default 180)")

    pol = p.add_argument_group("worker settings (default: this machine's TTSPOOL_* settings)")
    pol.add_argument("--max-batch", type=int, help="rows per GPU batch (TTSPOOL_MAX_BATCH)")
    pol.add_argument("--max-wait-ms", type=int, help="longest wait to fill a batch (TTSPOOL_MAX_WAIT_MS)")
    pol.add_argument("--aging-ms", type=int, help="bulk ranks as realtime after this (TTSPOOL_AGING_MS)")
    pol.add_argument("--realtime-rows", type=int, help="rows past max batch for realtime (TTSPOOL_REALTIME_ROWS)")
    pol.add_argument("--no-refill", action="store_true", help="batches end with their longest row (TTSPOOL_REFILL=0)")

    out = p.add_argument_group("results")
    out.add_argument("--target-p99", type=float, metavar="SECONDS",
                     help="find the smallest fleet (or --max-workers) whose realtime p99 queue wait meets this; "
                          f"when none does: why, what would, and exit status {TARGET_MISSED}")
    out.add_argument("--target-p99-bulk", type=float, metavar="SECONDS", help="and whose bulk p99 meets this")
    out.add_argument("--json-out", type=Path, help="write the results as JSON")
    out.add_argument("--plot", type=Path, metavar="PNG",
                     help="queue depth and workers over time (of the fleet found, with --target-p99)")

    chk = p.add_argument_group("validation against a real worker on this machine")
    chk.add_argument("--check-against-worker", action="store_true",
                     help="instead: replay a scaled-down profile through Redis and a real worker, measure the "
                          "curve here, simulate the same arrivals, compare mean queue waits")
    chk.add_argument("--model", help="with --check-against-worker: the worker's model (default random-tiny)")
    chk.add_argument("--device", help="with --check-against-worker: auto | cpu | cuda | cuda:N")
    chk.add_argument("--minutes", type=float, default=3.0, help="with --check-against-worker: replay length (default 3)")
    chk.add_argument("--load", type=float, default=0.8,
                     help="with --check-against-worker: mean offered load, a share of one worker's measured "
                          "capacity (default 0.8): 0.75x that, the middle third 1.5x")
    chk.add_argument("--timeout-s", type=float, default=1800.0,
                     help="with --check-against-worker: longest wait for the worker's warm-up, and for the "
                          "replayed jobs to start after the last was sent (default 1800)")
    p.set_defaults(handler=_simulate)


def worker_model(args: argparse.Namespace, settings: Settings, curve: Any) -> "WorkerModel":
    from scheduler.simulation import WorkerModel
    from scheduler.worker_policy import WorkerPolicy

    return WorkerModel(curve, WorkerPolicy.from_settings(settings, aging_ms=args.aging_ms,
                                                         realtime_rows=args.realtime_rows,
                                                         refill=settings.refill and not args.no_refill))


def _scaling(args: argparse.Namespace) -> "Scaling":
    from scheduler.simulation import Scaling

    if not args.autoscale:
        if args.min_workers is not None or args.max_workers is not None:
            raise UsageError("--min-workers and --max-workers are the autoscaler's: add --autoscale, or give a fixed "
                             "fleet with --workers")
        workers = 1 if args.workers is None else args.workers
        if workers < 1:
            raise UsageError("--workers must be at least 1")
        return Scaling.fixed(workers)
    if args.workers is not None:
        raise UsageError("--workers is a fixed fleet: with --autoscale give --min-workers and --max-workers")
    low = 1 if args.min_workers is None else args.min_workers
    high = max(8, low) if args.max_workers is None else args.max_workers
    if low < 0 or high < 1:
        raise UsageError("--min-workers must be at least 0 and --max-workers at least 1")
    if low > high and (args.target_p99, args.target_p99_bulk) == (None, None):
        raise UsageError(f"--min-workers {low} is more than --max-workers {high}: raise --max-workers (or give "
                         "--target-p99 to search it)")
    return Scaling(low, max(low, high), args.keda_target, args.poll_s, args.reaction_s, args.load_s,
                   args.scale_down_window_s, args.scale_down_period_s)


def _curve(args: argparse.Namespace) -> Any:
    from scheduler.simulation import Curve

    if (args.bench is None) == (args.curve is None):
        raise UsageError("give the worker's speed: --bench FILE (ttspool bench --json-out) or --curve B:AUDIO_S_PER_S,...")
    if args.curve is not None:
        return Curve.parse(args.curve)
    try:
        return Curve.from_bench(json.loads(args.bench.read_text()))
    except json.JSONDecodeError as err:
        raise UsageError(f"{args.bench}: not JSON ({err.msg})") from None


def _arrivals(args: argparse.Namespace, settings: Settings) -> tuple[list["Arrival"], dict[str, Any]]:
    if args.arrivals is not None:
        from ..text.frontend import FrontEnd
        from .simulate_arrivals import load_arrivals

        return load_arrivals(args.arrivals, FrontEnd.from_settings(settings)), {"arrivals": str(args.arrivals)}
    from dataclasses import asdict

    from scheduler.profile import Profile, arrivals

    profile = Profile(args.hours * 3600, args.base_rate, args.peak_rate, tuple(args.peaks), args.realtime_fraction,
                      args.realtime_audio_s, args.bulk_audio_s, args.length_sigma, args.realtime_ttl_s,
                      args.bulk_ttl_s)
    return arrivals(profile, args.seed), {**asdict(profile), "seed": args.seed}


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    if args.check_against_worker:
        from .simulate_check import check_against_worker

        return check_against_worker(args, settings, lambda curve: worker_model(args, settings, curve))
    from dataclasses import asdict

    from scheduler.simulation import remedies, simulate, smallest_fleet

    model = worker_model(args, settings, _curve(args))
    scaling = _scaling(args)
    jobs, source = _arrivals(args, settings)
    if not jobs:
        raise UsageError("the profile has no jobs: raise the rates or the hours")

    def run(s: "Scaling") -> "Report":
        return simulate(jobs, model, s)

    search, fixes = None, None
    if args.target_p99 is not None or args.target_p99_bulk is not None:
        # The answer is the fleet the search ends at, not the one it starts from.
        search = smallest_fleet(run, scaling, args.target_p99, args.target_p99_bulk)
        scaling, report = search.scaling, search.report
        if not search.met and not scaling.is_fixed:
            print(f"ttspool: {_fleet_text(scaling)} misses {_targets(args)}: looking for what meets it",
                  file=sys.stderr)
            fixes = remedies(run, search, args.target_p99, args.target_p99_bulk)
    else:
        report = run(scaling)
    _print(jobs, model, scaling, report)
    if search is not None:
        _print_search(search, fixes, args)
    if args.json_out:
        result: dict[str, Any] = {
            "jobs": len(jobs), "profile": source, "curve": [list(p) for p in model.curve.points],
            "worker": {**asdict(model.policy.planner),
                       **{k: v for k, v in asdict(model.policy).items() if k != "planner"}},
            "scaling": asdict(scaling), "report": report.to_dict(),
        }
        if search is not None:
            result["search"] = {
                "target_p99_s": args.target_p99, "target_p99_bulk_s": args.target_p99_bulk, "met": search.met,
                "missed": search.missed, "workers": search.workers,
                "simulations": search.runs + (fixes.runs if fixes else 0),
                "fewer": search.fewer.to_dict() if search.fewer else None,
                "remedies": None if fixes is None else {
                    name: None if found is None else {"scaling": asdict(found.scaling), **_summary(found.report)}
                    for name, found in (("fixed", fixes.fixed), ("min_workers", fixes.min_workers),
                                        ("keda_target", fixes.keda_target))},
            }
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(report, scaling, args.plot, None if search is None else _verdict(search, fixes, args))
    return TARGET_MISSED if search is not None and not search.met else 0


def _summary(report: "Report") -> dict[str, Any]:
    return {"peak_replicas": report.peak_replicas, "gpu_hours": report.gpu_hours,
            "p99_s": {p: None if w.p99_s is None or math.isinf(w.p99_s) else w.p99_s for p, w in report.waits.items()}}


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return "never" if math.isinf(x) else f"{x:.2f}"


def _p99(w: "Waits") -> str:
    """A p99 wait with its unit, or why there is none."""
    if w.p99_s is None:
        return "no jobs"
    if math.isinf(w.p99_s):
        return f"never ({(w.expired + w.unstarted) / w.jobs:.0%} of jobs did not run)"
    return f"{w.p99_s:.2f} s"


def _fleet_text(scaling: "Scaling") -> str:
    if scaling.is_fixed:
        return f"{scaling.max_workers} worker{'s' if scaling.max_workers != 1 else ''}"
    return (f"KEDA {scaling.min_workers}-{scaling.max_workers} workers, {scaling.target:g} waiting per worker, "
            f"+{scaling.reaction_s + scaling.load_s:g} s to serve")


def _targets(args: argparse.Namespace) -> str:
    return " and ".join(f"{name} p99 <= {t:g} s" for name, t in (("realtime", args.target_p99),
                                                                 ("bulk", args.target_p99_bulk)) if t is not None)


def _verdict(search: "Search", fixes: "Remedies | None", args: argparse.Namespace) -> str:
    if search.met:
        return f"the smallest fleet with {_targets(args)}"
    verdict = f"MISSED {_targets(args)} (exit status {TARGET_MISSED})"
    if fixes is not None and fixes.fixed is not None:
        verdict += f"; --workers {fixes.fixed.workers} meets it"
    if fixes is not None and fixes.min_workers is not None:
        verdict += f", so does --min-workers {fixes.min_workers.scaling.min_workers}"
    return verdict


def _print(jobs: list["Arrival"], model: "WorkerModel", scaling: "Scaling", report: "Report") -> None:
    from rich.console import Console
    from rich.table import Table

    pol = model.policy
    table = Table(title=f"{len(jobs)} jobs over {report.duration_s / 3600:.2f} h, {_fleet_text(scaling)}; "
                        f"max batch {pol.max_batch}, refill {'on' if pol.refill else 'off'}: queue wait "
                        "(enqueue to GPU row)")
    for col in ("priority", "jobs", "expired", "not started", "mean s", "p50 s", "p99 s", "max s"):
        table.add_column(col, justify="left" if col == "priority" else "right")
    for prio, w in report.waits.items():
        table.add_row(prio, str(w.jobs), str(w.expired), str(w.unstarted), _s(w.mean_s), _s(w.p50_s), _s(w.p99_s),
                      _s(w.max_s))
    console = Console(width=120)
    console.print(table)
    hours = report.end_s / 3600
    print(f"{report.gpu_hours:.1f} GPU-hours over {hours:.2f} h (mean {report.gpu_hours / hours if hours else 0:.1f} "
          f"workers, peak {report.peak_workers}); busy {report.utilization:.0%} of it, "
          f"{report.mean_rows:.1f} rows stepping at a time")


def _reached(report: "Report") -> str:
    w = report.waits
    return f"p99 realtime {_p99(w['realtime'])}, bulk {_p99(w['bulk'])}, {report.gpu_hours:.1f} GPU-hours"


def _print_search(search: "Search", fixes: "Remedies | None", args: argparse.Namespace) -> None:
    from scheduler.simulation import MISSED_AUTOSCALER, MISSED_PLATEAU

    r = search.report
    if search.met:
        what = "workers" if search.scaling.is_fixed else "--max-workers"
        line = f"smallest fleet with {_targets(args)}: {search.workers} {what} ({_reached(r)})"
        if search.fewer is not None:
            f = search.fewer
            line += f"; {search.workers - 1}: p99 realtime {_p99(f.waits['realtime'])}, bulk {_p99(f.waits['bulk'])}"
        print(line)
        return
    n = search.workers
    if search.missed == MISSED_AUTOSCALER:
        why = (f"it used at most {r.peak_replicas} of its {n} workers: KEDA adds workers too late for this traffic, "
               "and a higher --max-workers gives the same run")
    elif search.missed == MISSED_PLATEAU:
        why = (f"{n} workers wait no less than {n // 2}, and a worker took each job as it came: what is left is "
               "each worker's wait to fill a batch (--max-wait-ms) and the batches ahead of a job, not the size "
               "of the fleet")
    else:
        why = f"the search stopped at {n} workers"
    print(f"target missed: {_targets(args)}. The table above is {_fleet_text(search.scaling)}, the most the search "
          f"tried: {_reached(r)}; {why}.")
    lines = []
    if fixes is not None:
        asked = search.scaling
        if fixes.min_workers is not None:
            found = fixes.min_workers
            lines.append(f"--min-workers {found.scaling.min_workers} --max-workers {found.report.peak_replicas} "
                         f"(the most it then uses): {_reached(found.report)}")
        if fixes.keda_target is not None:
            found = fixes.keda_target
            lines.append(f"--keda-target {found.scaling.target:g} --max-workers {found.report.peak_replicas} "
                         f"(instead of {asked.target:g}): {_reached(found.report)}")
        if fixes.fixed is not None:
            lines.append(f"a fixed fleet, --workers {fixes.fixed.workers} without --autoscale: "
                         f"{_reached(fixes.fixed.report)}")
    reachable = [f"--{flag} {math.ceil(w.p99_s * 100) / 100:g}" for flag, t, w in (
        ("target-p99", args.target_p99, r.waits["realtime"]), ("target-p99-bulk", args.target_p99_bulk, r.waits["bulk"]))
        if t is not None and w.p99_s is not None and math.isfinite(w.p99_s) and w.p99_s > t]
    if reachable:
        lines.append(f"{'or ' if lines else ''}a target this fleet meets: {' '.join(reachable)}")
    print("what would meet it:" if lines else "no fleet or target the search tried meets it")
    for line in lines:
        print(f"  {line}")
    print(f"exit status {TARGET_MISSED}: the target was missed")


def plot(report: "Report", scaling: "Scaling", path: Path, verdict: str | None = None) -> None:
    fig = chart(report, scaling, verdict)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def chart(report: "Report", scaling: "Scaling", verdict: str | None = None) -> "Figure":
    """Jobs waiting and workers over time for `report`, the run of `scaling`; `verdict`,
    what the run says about a target, goes in the title."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib (the worker extra: pip install 'ttspool[worker]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tl = report.timeline
    hours = [s.t / 3600 for s in tl]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(2, 1))
    top.plot(hours, [s.queued + s.held for s in tl], color="#4477aa", label="waiting (Redis + prefetched)")
    top.plot(hours, [s.queued for s in tl], color="#aa7744", label="in Redis (what KEDA sees)")
    top.plot(hours, [s.running for s in tl], color="#44aa77", linewidth=0.8, label="rows on the GPUs")
    top.set_ylabel("jobs")
    top.legend(loc="upper left")
    bottom.step(hours, [s.workers for s in tl], where="post", color="#bbbbbb", linewidth=3, label="provisioned")
    bottom.step(hours, [s.ready for s in tl], where="post", color="#222222", label="serving")
    if not scaling.is_fixed:
        bottom.axhline(scaling.max_workers, color="#aa3377", linestyle="--", linewidth=1,
                       label=f"--max-workers {scaling.max_workers}")
    # From zero to above the fleet: a fleet of one is a line at 1, not the whole axis.
    most = max([scaling.max_workers, *(s.workers for s in tl)])
    bottom.set_ylim(0, most * 1.4 + 0.5)
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_ylabel("workers")
    bottom.set_xlabel("hours")
    bottom.legend(loc="upper left", ncols=3, fontsize=8)
    w = report.waits
    title = (f"{_fleet_text(scaling)}\np99 queue wait: realtime {_p99(w['realtime'])}, bulk {_p99(w['bulk'])}; "
             f"{report.gpu_hours:.1f} GPU-hours")
    top.set_title(title + (f"\n{verdict}" if verdict else ""), fontsize=10)
    fig.tight_layout()
    return fig
