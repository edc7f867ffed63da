"""`ttspool bench`: capacity planning numbers for this machine (see workers/bench/engine_bench.py)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ..settings import Settings


def _sizes(raw: str) -> list[int]:
    try:
        sizes = sorted({int(x) for x in raw.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-sizes must be integers like 1,8,32, got {raw!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > 256:
        raise argparse.ArgumentTypeError("--batch-sizes must be between 1 and 256")
    return sizes


def add_commands(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure ttspool's engine against one Chat.infer call per job")
    p.add_argument("--model", help="chattts | random-tiny | random-full | /path (default: TTSPOOL_MODEL, else chattts)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", help="auto | float16 | bfloat16 | float32")
    p.add_argument("--quant", help="none | int8: weight-only int8 GPT linears (CPU, bfloat16)")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the GPT")
    p.add_argument("--jobs", type=int, default=32, help="jobs in the set (default 32)")
    p.add_argument("--batch-sizes", type=_sizes, default=[1, 8, 32], help="comma-separated (default 1,8,32)")
    p.add_argument("--no-keep-rows", action="store_true", help="skip the run with finished rows kept")
    p.add_argument("--no-refill", action="store_true", help="skip the run with ended rows replaced from the backlog")
    p.add_argument("--precision", action="store_true",
                   help="instead: each half dtype (and int8 weights, on the CPU) against float32 on the "
                        "same inputs (KL, top-1, SNR)")
    p.add_argument("--frontend", action="store_true",
                   help="instead: the text front-end's time per 200-character job, and its share of one "
                        "batch of the largest --batch-sizes rows")
    p.add_argument("--voices", action="store_true",
                   help="instead: a recording voice's cost (DVAE encoding, and a batch of the largest "
                        "--batch-sizes rows with a quarter on recording voices against seed voices only)")
    p.add_argument("--gateway", metavar="URL",
                   help="instead: latency the HTTP gateway at URL adds over the Python client (a running stack)")
    p.add_argument("--key", help="with --gateway: an API key")
    p.add_argument("--concurrency", type=int, default=300, help="with --gateway: requests open at once")
    p.add_argument("--row-steps", type=int, default=256,
                   help="with --frontend or --voices: cut each batch row at this many steps (0: full length)")
    p.add_argument("--pipeline", action="store_true",
                   help="instead: the whole path (Redis, a worker process, S3 behind a delay proxy, all started "
                        "here on loopback) against the engine alone, on the same jobs at the largest "
                        "--batch-sizes; then realtime latency under bulk load (S3: moto from the test extra, "
                        "or TTSPOOL_STORAGE_URL=s3://... with TTSPOOL_S3_ENDPOINT_URL=http://...)")
    p.add_argument("--storage-delay-ms", type=float, default=50.0,
                   help="with --pipeline: the second run's delay per storage round trip (default 50)")
    p.add_argument("--bulk-jobs", type=int,
                   help="with --pipeline: long bulk jobs in the latency run (default twice the batch size)")
    p.add_argument("--rt-jobs", type=int, help="with --pipeline: short realtime jobs in the latency run (default 4, "
                                               "at most the batch size: one batch)")
    p.add_argument("--footprint", action="store_true",
                   help="instead: the broker's Redis memory and commands per job (submit, run, status), in the "
                        "result window and after it (a throwaway Redis, S3 and worker, as --pipeline)")
    p.add_argument("--footprint-jobs", type=int, default=500, help="with --footprint: jobs (default 500)")
    p.add_argument("--result-ttl", type=int, default=15,
                   help="with --footprint: the worker's TTSPOOL_RESULT_TTL, seconds (default 15)")
    p.add_argument("--soak", action="store_true",
                   help="instead: many short jobs through one worker process (a throwaway Redis, S3 and worker, "
                        "as --pipeline): jobs/s, latency, and the worker's idle RSS after each drain (a leak shows "
                        "as growth per job)")
    p.add_argument("--soak-jobs", type=int, default=2000, help="with --soak: jobs (default 2000)")
    p.add_argument("--soak-drain-every", type=int, default=500,
                   help="with --soak: drain and read the idle RSS after this many jobs (default 500)")
    p.add_argument("--soak-window", type=int, default=64, help="with --soak: jobs in flight (default 64)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="with --pipeline, --footprint or --soak: longest wait for the worker to be ready, and for "
                        "each run (default 1800 s)")
    p.add_argument("--json-out", type=Path, help="write the results as JSON")
    p.add_argument("--plot", type=Path,
                   help="write a PNG bar chart: audio s/s per run, x the baseline (its dtype and ttspool's "
                        "named), real time marked")
    p.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.gateway:
        return _gateway(args, settings, Console(stderr=True))

    if not 1 <= args.jobs <= 4096:
        raise ValueError("--jobs must be between 1 and 4096")
    console = Console(stderr=True)
    # Random weights never emit EOS, so the baseline would log "hit max_new_token" per job.
    logging.getLogger("ChatTTS").setLevel(logging.ERROR)
    if args.footprint:
        from .bench_footprint import run_footprint

        return run_footprint(args, settings, console)
    if args.soak:
        from .bench_soak import run_soak

        return run_soak(args, settings, console)
    if args.pipeline:
        from .bench_pipeline import run_pipeline

        return run_pipeline(args, settings, console, lambda: _engine(settings, console))

    from workers.bench.engine_bench import Run, bench, plot, write_json

    if args.precision:
        return _precision(args, settings, console)
    if args.frontend:
        return _frontend(args, settings, console)
    if args.voices:
        return _voices(args, settings, console)
    engine = _engine(settings, console)

    def progress(run: Run) -> None:
        console.log(f"{run.name}: {run.audio_s_per_s:.2f} audio s/s in {run.wall_s:.1f} s")

    result = bench(engine, args.jobs, args.batch_sizes, not args.no_keep_rows, not args.no_refill, on_run=progress)
    m, j = result["machine"], result["jobs"]
    numerics = m["dtype"] if m["quant"] == "none" else f"{m['dtype']}+{m['quant']}"
    table = Table(title=f"{m['model']} on {m.get('gpu', m['device'])} ({numerics}, {m['threads']} threads): "
                        f"{j['count']} jobs, {j['min_steps']}-{j['max_steps']} steps, {j['voices']} voices")
    for col in ("run", "dtype", "audio s/s", "steps/s", "RTF", "peak RSS MiB", "peak GPU MiB", "x baseline"):
        table.add_column(col, justify="left" if col in ("run", "dtype") else "right")
    for row in [result["baseline"], *result["runs"]]:
        gpu = row["peak_gpu_bytes"]
        table.add_row(row["name"], row["dtype"], f"{row['audio_s_per_s']:.2f}", f"{row['steps_per_s']:.1f}", f"{row['rtf']:.3f}",
                      f"{row['peak_rss_bytes'] / 2**20:.0f}", "-" if gpu is None else f"{gpu / 2**20:.0f}",
                      f"{row['ratio_to_baseline']:.2f}")
    Console(width=120).print(table)
    if "drop_finished_vs_keep" in result:
        print(f"dropping finished rows vs keeping them: {result['drop_finished_vs_keep']:.2f}x")
    if args.json_out:
        write_json(result, args.json_out)
    if args.plot:
        plot(result, args.plot)
    return 0


def _precision(args: argparse.Namespace, settings: Settings, console: Any) -> int:
    from rich.console import Console
    from rich.table import Table

    from workers.bench.engine_bench import write_json
    from workers.bench.precision import precision_report
    from workers.engine.engine import Engine
    from workers.engine.assets import ModelFetch
    from workers.engine.dtypes import pick_device

    # float16 and bfloat16 everywhere: slow on a CPU without native half arithmetic, but
    # the point is what the dtype does to the numbers, and CUDA runs the same code.
    variants = [("float32", "none")] + [(d, "none") for d in ("bfloat16", "float16") if settings.dtype in ("auto", d)]
    if settings.dtype in ("auto", "bfloat16") and pick_device(settings.device).type == "cpu":
        variants.append(("bfloat16", "int8"))  # TTSPOOL_QUANT=int8 runs on the CPU only
    engines = {}
    names = [d if q == "none" else f"{d}+{q}" for d, q in variants]
    with console.status("loading the model in " + ", ".join(names)):
        for name, (dtype, quant) in zip(names, variants):
            engines[name] = Engine(settings.model, settings.model_dir, settings.device, dtype,
                                   fetch=ModelFetch.from_settings(settings), quant=quant).load()
    result = precision_report(engines, n_jobs=min(args.jobs, 8))
    table = Table(title=f"{result['model']} on {result['device']}: {result['jobs']} jobs x {result['max_steps']} "
                        f"steps, teacher-forced against float32"
                        + (" (RANDOM weights)" if result["random_weights"] else ""))
    for col in ("dtype", "KL mean", "KL max", "top-1 agree", "SNR dB mean", "SNR dB min", "non-finite steps"):
        table.add_column(col, justify="left" if col == "dtype" else "right")
    for name, r in result["dtypes"].items():
        table.add_row(name, f"{r['kl_mean']:.2e}", f"{r['kl_max']:.2e}", f"{r['top1_agreement']:.4f}",
                      f"{r['snr_db_mean']:.1f}", f"{r['snr_db_min']:.1f}", str(r["non_finite_steps"]))
    Console(width=120).print(table)
    if args.json_out:
        write_json(result, args.json_out)
    return 0


def _frontend(args: argparse.Namespace, settings: Settings, console: Any) -> int:
    from rich.console import Console
    from rich.table import Table

    from workers.bench.engine_bench import write_json
    from workers.bench.frontend_bench import bench_frontend

    engine = _engine(settings, console)
    result = bench_frontend(engine, rows=args.batch_sizes[-1], row_steps=args.row_steps, log=console.log)
    table = Table(title="text front-end per job (about 200 characters of text full of numbers)")
    for col in ("language", "texts", "median ms", "p99 ms"):
        table.add_column(col, justify="left" if col == "language" else "right")
    for lang, r in result["languages"].items():
        table.add_row(lang, str(r["texts"]), f"{r['median_ms']:.3f}", f"{r['p99_ms']:.3f}")
    Console(width=120).print(table)
    b = result["batch"]
    cut = f", rows cut at {b['row_steps_cap']} steps" if b["row_steps_cap"] else ""
    print(f"one batch of {b['rows']} jobs{cut} on {engine.model_id} ({engine.device}, "
          f"{str(engine.dtype).removeprefix('torch.')}): {b['batch_s']:.1f} s; front-end for its texts "
          f"{b['frontend_s'] * 1000:.1f} ms = {b['frontend_share']:.3%} of the batch")
    if args.json_out:
        write_json(result, args.json_out)
    return 0


def _gateway(args: argparse.Namespace, settings: Settings, console: Any) -> int:
    from rich.console import Console
    from rich.table import Table

    from workers.bench.gateway_bench import bench_gateway

    if not 1 <= args.concurrency <= 4096:
        raise ValueError("--concurrency must be between 1 and 4096")
    result = bench_gateway(args.gateway, args.key, settings, args.jobs, args.concurrency, log=console.log)
    table = Table(title=f"{result['jobs']} jobs, {result['concurrency']} open at once: "
                        f"enqueue to audio, {result['errors']} errors")
    for col in ("path", "p50 s", "p99 s", "max s"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for name in ("direct", "gateway"):
        r = result[name]
        table.add_row("Python client" if name == "direct" else "HTTP gateway", f"{r['p50_s']:.3f}",
                      f"{r['p99_s']:.3f}", f"{r['max_s']:.3f}")
    table.add_row("added by the gateway", f"{result['added']['p50_s']:.3f}", f"{result['added']['p99_s']:.3f}", "")
    Console(width=120).print(table)
    s, rss = result["stream"], result["gateway_rss_bytes"]
    print(f"streamed {s['segments']} segments ({s['audio_s']} s of audio): first audio after {s['first_audio_s']} s, "
          f"all of it after {s['total_s']} s")
    if rss["before"] and rss["after"]:
        print(f"gateway memory: {rss['before'] / 2**20:.0f} MiB before, {rss['after'] / 2**20:.0f} MiB after")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")  # torch-free: not engine_bench's writer
    return 0 if result["errors"] == 0 else 1


def _engine(settings: Settings, console: Any) -> Any:
    from workers.engine.engine import Engine
    from workers.engine.assets import ModelFetch

    with console.status("loading the model"):
        return Engine(settings.model, settings.model_dir, settings.device, settings.dtype, settings.compile,
                      ModelFetch.from_settings(settings), quant=settings.quant).load()


def _voices(args: argparse.Namespace, settings: Settings, console: Any) -> int:
    from rich.console import Console
    from rich.table import Table

    from workers.bench.engine_bench import write_json
    from workers.bench.voice_bench import bench_voices

    engine = _engine(settings, console)
    result = bench_voices(engine, rows=args.batch_sizes[-1], row_steps=args.row_steps, log=console.log)
    cut = f", rows cut at {result['row_steps_cap']} steps" if result["row_steps_cap"] else ""
    table = Table(title=f"one batch of {result['rows']} rows{cut} on {engine.model_id} ({engine.device}, "
                        f"{str(engine.dtype).removeprefix('torch.')})")
    for col in ("voices", "wall s", "row-steps/s", "vs seed voices"):
        table.add_column(col, justify="left" if col == "voices" else "right")
    for label, r in result["batches"].items():
        table.add_row(label, f"{r['wall_s']:.1f}", f"{r['row_steps_per_s']:.1f}", f"{r['vs_seed_voices']:.3f}x")
    Console(width=120).print(table)
    for length, e in result["encode"].items():
        print(f"DVAE encoding of a {length} recording: {e['median_ms']:.1f} ms ({e['codes']} codes), "
              "once per recording and worker")
    if args.json_out:
        write_json(result, args.json_out)
    return 0
