"""`ttspool simulate --check-against-worker`: the simulator against a real worker.

Everything runs on this machine, on loopback, and everything started here is stopped
here: a throwaway redis-server, a storage folder, one worker process.

1. The curve: the engine, loaded in this process, runs this check's own jobs at batch
   sizes 1, 2, 4, ... up to the worker's rows (max batch + realtime rows), finished rows
   leaving the batch, as `ttspool bench` measures; then it is let go, so the worker has
   the device to itself.
2. The profile, scaled down: `--minutes` of Poisson arrivals, a `--realtime-fraction` of
   them realtime, the mean offered load `--load` x the curve's capacity at max batch, in
   three thirds: 0.75x, 1.5x (a peak: a backlog builds), 0.75x (it drains).
3. The replay: each job submitted at its time with the producer API (which stamps
   enqueued_at). The worker's `ttspool_queue_wait_seconds` histogram, read before and
   after, gives the mean queue wait of the replayed jobs per queue.
4. The simulation of the same jobs at the times they were sent, with the curve of step 1.

Exit status 1 when the two mean waits over all jobs differ by more than 25 %.
Lengths are exact with the random-weight models (their rows end at the predicted
length); with real weights a row ends where the model says, and the check measures the
prediction too.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import shutil
import tempfile
import time
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError
from ..settings import QUEUE_BULK, QUEUE_REALTIME, Settings
from .local_redis import LocalRedis, free_port

AGREEMENT = 0.25  # the bar: simulated mean wait within 25 % of the real one
_POOL = 64  # texts per priority; each job takes one with a seed of its own (no cache hits)
_CHARS = {"realtime": (10, 40), "bulk": (40, 160)}


def check_against_worker(args: argparse.Namespace, settings: Settings, model_for: Callable[[Any], Any]) -> int:
    """`model_for(curve)`: the WorkerModel of the worker this check starts, with that curve."""
    from rich.console import Console

    if not 0 < args.minutes <= 120 or not 0 < args.load <= 2:
        raise UsageError("--minutes must be within 0-120 and --load within 0-2")
    if not 0 <= args.realtime_fraction <= 1:
        raise UsageError("--realtime-fraction must be within 0-1")
    settings = settings.override(model=args.model or "random-tiny")
    console = Console(stderr=True)
    logging.getLogger("ChatTTS").setLevel(logging.ERROR)  # random weights: "hit max_new_token" per row

    pools = _pools()
    curve, steps = _measure(settings, console, pools, model_for, args)
    jobs, arrivals = _plan(curve, steps, pools, settings, args)
    console.log(f"replaying {len(jobs)} jobs over {args.minutes:g} min through a real worker")
    real, sent = _replay(settings, jobs, [a.t for a in arrivals], console, args)

    from scheduler.simulation import Arrival, Scaling, curve_scale_for, simulate

    replayed = [Arrival(t, a.steps, a.priority) for t, a in zip(sent, arrivals)]
    model = model_for(curve)
    report = simulate(replayed, model, Scaling.fixed(1))
    sim = {QUEUE_REALTIME: report.waits["realtime"], QUEUE_BULK: report.waits["bulk"]}
    n_real = sum(n for _, n in real.values())
    # Near saturation a mean wait moves several times faster than throughput: the
    # throughput factor that explains the real wait says how far off the curve was.
    scale = curve_scale_for(replayed, model, Scaling.fixed(1), sum(t for t, _ in real.values()) / n_real) \
        if n_real else None
    return _compare(real, sim, curve, scale, len(jobs), args)


def _pools() -> dict[str, list[Any]]:
    from workers.bench.engine_bench import make_jobs

    return {prio: make_jobs(_POOL, seed=seed, min_chars=lo, max_chars=hi)
            for seed, (prio, (lo, hi)) in enumerate(_CHARS.items(), 1)}


def _sizes(top: int) -> list[int]:
    sizes, b = {top}, 1
    while b < top:
        sizes.add(b)
        b *= 2
    return sorted(sizes)


def _measure(settings: Settings, console: Any, pools: dict[str, list[Any]], model_for: Callable[[Any], Any],
             args: argparse.Namespace) -> tuple[Any, dict[str, int]]:
    """The curve on this check's jobs, and each pool text's steps as the worker predicts
    them (front-end, then the engine's normalizer). Loaded here, run on another thread,
    as the worker does (tasks/cli/bench.py, workers/bench/pipeline_bench.py: a 2-core CPU
    runs batches from the loading thread 3-7x slower)."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from scheduler.simulation import Curve
    from tasks.text.frontend import FrontEnd
    from tasks.text.lengths import predicted_steps
    from workers.bench.engine_bench import measure_engine, run_engine

    from .bench import _engine

    engine = _engine(settings, console)
    try:
        frontend = FrontEnd.from_settings(settings)
        spoken = {r.text: engine.normalize(frontend.speak(r.text).spoken_text) for p in pools.values() for r in p}
        steps = {text: predicted_steps(s, 5) for text, s in spoken.items()}
        top = model_for(Curve(((1, 1.0),))).policy.max_rows  # rows do not depend on the curve
        rng = random.Random(args.seed)
        mix = [replace(r, text=spoken[r.text])
               for r in (rng.choice(pools["realtime" if rng.random() < args.realtime_fraction else "bulk"])
                         for _ in range(2 * top))]

        def measure() -> list[tuple[int, float]]:
            run_engine(engine, mix[:top], top, "drop")  # untimed, as `ttspool bench` does
            points = []
            for b in _sizes(top):
                run = measure_engine(engine, mix[:max(8, 2 * b)], b)
                console.log(f"curve: B={b} {run.audio_s_per_s:.2f} audio s/s")
                points.append((b, run.audio_s_per_s))
            return points

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="check-engine") as pool:
            points = pool.submit(measure).result()
    finally:
        type(engine).speaker.cache_clear()  # it holds the engine (as in workers/bench/pipeline_bench.py)
        engine = None
        gc.collect()
    return Curve(tuple(points)), steps


def _plan(curve: Any, steps: dict[str, int], pools: dict[str, list[Any]], settings: Settings,
          args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[Any]]:
    from scheduler.profile import Profile, arrivals
    from scheduler.simulation import Arrival
    from tasks.text.lengths import STEPS_PER_SECOND

    mean_steps = {p: sum(steps[r.text] for r in pool) / len(pool) for p, pool in pools.items()}
    job_audio_s = (args.realtime_fraction * mean_steps["realtime"]
                   + (1 - args.realtime_fraction) * mean_steps["bulk"]) / STEPS_PER_SECOND
    capacity_per_h = curve.audio_s_per_s(settings.max_batch) / job_audio_s * 3600
    d = args.minutes * 60
    rate = args.load * capacity_per_h
    times = arrivals(Profile(duration_s=d, base_per_h=0.75 * rate, peak_per_h=1.5 * rate, peaks=((d / 3, 2 * d / 3),),
                             realtime_fraction=args.realtime_fraction), args.seed)
    rng = random.Random(args.seed)
    run = uuid.uuid4().hex[:8]
    jobs, planned = [], []
    for i, a in enumerate(times):
        req = rng.choice(pools[a.priority])
        jobs.append({"text": req.text, "voice": req.voice, "seed": i, "priority": a.priority,
                     "job_id": f"simcheck-{run}-{i}"})
        planned.append(Arrival(a.t, steps[req.text], a.priority))
    if not jobs:
        raise UsageError("the scaled-down profile has no jobs: raise --minutes or --load")
    return jobs, planned


def _queue_waits(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) of ttspool_queue_wait_seconds per queue, from the worker's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, list[float]] = {QUEUE_REALTIME: [0.0, 0.0], QUEUE_BULK: [0.0, 0.0]}
    for family in text_string_to_metric_families(text):
        if family.name != "ttspool_queue_wait_seconds":
            continue
        for s in family.samples:
            queue = s.labels.get("queue", "")
            if queue in out and s.name.endswith(("_sum", "_count")):
                out[queue][0 if s.name.endswith("_sum") else 1] = s.value
    return {q: (v[0], v[1]) for q, v in out.items()}


def _replay(settings: Settings, jobs: list[dict[str, Any]], times: list[float], console: Any,
            args: argparse.Namespace) -> tuple[dict[str, tuple[float, int]], list[float]]:
    """Runs the worker, submits each job at its time; ((wait sum, jobs) per queue, the
    seconds from the first submit each job was actually sent at)."""
    from ..producer import Client
    from ..polling import poll
    from .local_run import child_env
    from .worker_process import running_worker

    folder = Path(tempfile.mkdtemp(prefix="ttspool-simcheck-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, folder, True)
        redis = stack.enter_context(LocalRedis())
        port = free_port()
        worker_settings = settings.override(
            broker_url=redis.url, result_backend=redis.url, storage_url=(folder / "out").as_uri(),
            metrics_port=port, metrics_addr="127.0.0.1", rate_limits="")
        log = folder / "worker.log"
        worker = stack.enter_context(running_worker(child_env(worker_settings), log))

        def alive() -> None:
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with code {worker.returncode}; its log ends: "
                                   f"{log.read_text(errors='replace')[-3000:]}")

        client = Client(worker_settings)
        stack.callback(client.close)
        # Ready and warm: one job, then one full batch (its first batch of that size pays
        # for heap growth and kernel selection; the curve was measured warm too).
        warm = [{"text": j["text"], "seed": 10**6 + i, "priority": "bulk"} for i, j in enumerate(jobs[:settings.max_batch])]
        for batch in (warm[:1], warm):
            ids = client.submit_many(batch)

            def done(ids: list[str] = ids) -> bool | None:
                alive()
                return all(client.status(i).done for i in ids) or None

            poll(done, timeout=args.timeout_s, every=0.5,
                 timed_out=lambda: f"the worker did not finish its warm-up jobs within {args.timeout_s:.0f} s")
        before = _queue_waits(port)
        sent: list[float] = []
        t0, wall0 = time.monotonic(), time.time()
        for job, t in zip(jobs, times):
            delay = t0 + t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            alive()
            sent.append(time.time() - wall0)
            client.submit(job)
        console.log(f"all submitted ({max(0.0, sent[-1] - times[-1]):.2f} s behind plan); waiting for the last to start")
        expected = sum(before[q][1] for q in before) + len(jobs)

        def started() -> dict[str, tuple[float, float]] | None:
            alive()
            now = _queue_waits(port)
            return now if sum(v[1] for v in now.values()) >= expected else None

        after = poll(started, timeout=args.timeout_s, every=1.0,
                     timed_out=lambda: f"not every replayed job started within {args.timeout_s:.0f} s")
    return {q: (after[q][0] - before[q][0], int(after[q][1] - before[q][1])) for q in after}, sent


def _compare(real: dict[str, tuple[float, int]], sim: dict[str, Any], curve: Any, scale: float | None, jobs: int,
             args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{jobs} jobs over {args.minutes:g} min, one worker ({args.model or 'random-tiny'}), "
                        f"offered load {args.load:g}: mean queue wait, enqueue to GPU row")
    for col in ("queue", "jobs", "real s", "simulated s", "simulated / real"):
        table.add_column(col, justify="left" if col == "queue" else "right")
    rows: dict[str, dict[str, Any]] = {}
    for q in (QUEUE_REALTIME, QUEUE_BULK):
        total, n = real[q]
        w = sim[q]
        rows[q] = {"jobs": n, "real_mean_s": total / n if n else None,
                   "simulated_mean_s": w.mean_s, "simulated_jobs": w.started}
    n_all = sum(r[1] for r in real.values())
    sim_started = sum(w.started for w in sim.values())
    rows["all"] = {"jobs": n_all, "real_mean_s": sum(r[0] for r in real.values()) / n_all if n_all else None,
                   "simulated_mean_s": (sum((w.mean_s or 0.0) * w.started for w in sim.values()) / sim_started
                                        if sim_started else None),
                   "simulated_jobs": sim_started}
    for name, r in rows.items():
        ratio = _ratio(r)
        r["ratio"] = ratio
        table.add_row(name, str(r["jobs"]), _num(r["real_mean_s"]), _num(r["simulated_mean_s"]), _num(ratio))
    Console(width=120).print(table)
    ratio = rows["all"]["ratio"]
    ok = ratio is not None and abs(ratio - 1) <= AGREEMENT
    print(f"curve measured here: {', '.join(f'B={b} {v:.2f}' for b, v in curve.points)} audio s/s; "
          f"mean waits {'agree' if ok else 'DISAGREE'} within {AGREEMENT:.0%} (simulated / real {_num(ratio)})")
    if scale is not None:
        print(f"the real worker waited as the simulation does with {scale:.2f}x the curve's throughput "
              "(below 1: work outside the engine's curve took GPU or CPU time)")
    if args.json_out:
        args.json_out.write_text(json.dumps({"jobs": jobs, "minutes": args.minutes, "load": args.load,
                                             "curve": [list(p) for p in curve.points], "waits": rows,
                                             "agree": ok, "tolerance": AGREEMENT, "curve_scale_for_real": scale},
                                            indent=2) + "\n")
    return 0 if ok else 1


def _ratio(row: dict[str, Any]) -> float | None:
    real, sim = row["real_mean_s"], row["simulated_mean_s"]
    return sim / real if real and sim is not None else None


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"

