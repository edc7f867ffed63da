"""The `ttspool` command line. Producer commands never import torch."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .schema import JobValidationError
from .settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]

# Each module adds its own subcommands (`add_commands(sub)`, with `handler=` set as a
# parser default), so a command group lives next to the code it drives. They must
# import without torch: heavy imports belong inside the handlers.
_COMMAND_MODULES: tuple[str, ...] = (
    "tasks.cli_exporter", "tasks.cli_model", "tasks.cli_bulk", "tasks.cli_bench", "tasks.cli_doctor",
)


def _voice(raw: str) -> int | str:
    return int(raw) if raw.isdigit() else raw


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="chattts | random-tiny | random-full | /path/to/assets (TTSPOOL_MODEL)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (TTSPOOL_DEVICE)")
    p.add_argument("--dtype", help="auto | float16 | bfloat16 | float32 (TTSPOOL_DTYPE)")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the GPT (TTSPOOL_COMPILE=1)")
    p.add_argument("--max-batch", type=int, help="rows per GPU batch (TTSPOOL_MAX_BATCH)")
    p.add_argument("--max-wait-ms", type=int, help="longest wait to fill a batch (TTSPOOL_MAX_WAIT_MS)")
    p.add_argument("--storage-url", help="file:///abs/dir or s3://bucket/prefix (TTSPOOL_STORAGE_URL)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ttspool", description="GPU batch text-to-speech on a Celery queue.")
    ap.add_argument("--broker-url", help="redis://... (TTSPOOL_BROKER_URL)")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="enqueue one job and print its id")
    s.add_argument("text")
    s.add_argument("--voice", type=_voice, help="integer speaker seed, or a ChatTTS speaker string")
    s.add_argument("--seed", type=int)
    s.add_argument("--speed", type=int)
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-p", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--priority", choices=["realtime", "bulk"])
    s.add_argument("--job-id")
    s.add_argument("--ttl", type=float, dest="ttl_s", help="seconds after which an unstarted job expires")
    s.add_argument("--wait", action="store_true", help="wait for the result")
    s.add_argument("--timeout", type=float, default=600.0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=_submit)

    st = sub.add_parser("status", help="print a job's status")
    st.add_argument("job_id")
    st.add_argument("--json", action="store_true")
    st.set_defaults(handler=_status)

    w = sub.add_parser("worker", help="run one GPU worker")
    add_engine_flags(w)
    w.add_argument("--loglevel", default="INFO")
    w.set_defaults(handler=_worker)

    r = sub.add_parser("run", help="run the whole pipeline locally on the example jobs")
    add_engine_flags(r)
    r.add_argument("--jobs", type=Path, help="JSONL file of jobs (default: the shipped examples)")
    r.add_argument("--out", type=Path, default=Path("out"), help="output folder when no storage is configured")
    r.add_argument("--timeout", type=float, default=3600.0)
    r.set_defaults(handler=_run)

    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return ap


def print_status(st: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(st.to_dict()))
    else:
        line = f"{st.id} {st.status}"
        if st.url:
            line += f" {st.duration_s:.2f}s {st.url}"
        if st.error:
            line += f" {st.error}"
        print(line)


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env().override(
        broker_url=args.broker_url,
        model=getattr(args, "model", None),
        device=getattr(args, "device", None),
        dtype=getattr(args, "dtype", None),
        compile=getattr(args, "compile", None),
        max_batch=getattr(args, "max_batch", None),
        max_wait_ms=getattr(args, "max_wait_ms", None),
        storage_url=getattr(args, "storage_url", None),
    )


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    from .producer import Client

    job = {
        "text": args.text, "voice": args.voice, "seed": args.seed, "speed": args.speed,
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "max_tokens": args.max_tokens, "priority": args.priority, "job_id": args.job_id,
        "ttl_s": args.ttl_s,
    }
    client = Client(settings)
    try:
        job_id = client.submit({k: v for k, v in job.items() if v is not None})
        if not args.wait:
            print(json.dumps({"id": job_id}) if args.json else job_id)
            return 0
        st = client.wait([job_id], timeout=args.timeout)[0]
        print_status(st, args.json)
        return 0 if st.status == "SUCCESS" else 1
    finally:
        client.close()


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from .cli_bulk import print_book_status
    from .producer import Client

    client = Client(settings)
    try:
        if not print_book_status(client, args.job_id, args.json):
            print_status(client.status(args.job_id), args.json)
    finally:
        client.close()
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from workers.worker import run_worker

    run_worker(settings, args.loglevel.upper())
    return 0


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from .local_run import run_local

    return run_local(settings, args.jobs, args.out, args.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        handler: Handler = args.handler
        return handler(args, _settings(args))
    except (JobValidationError, ValueError, FileNotFoundError) as err:
        print(f"ttspool: error: {err}", file=sys.stderr)
        return 2
    except TimeoutError as err:
        print(f"ttspool: timeout: {err}", file=sys.stderr)
        return 3
    except RuntimeError as err:
        print(f"ttspool: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
