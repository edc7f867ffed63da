"""The `ttspool` command line. Producer commands never import torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .schema import JobValidationError
from .settings import Settings


def _voice(raw: str) -> int | str:
    return int(raw) if raw.isdigit() else raw


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="chattts | random-tiny | random-full | /path/to/assets (TTSPOOL_MODEL)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (TTSPOOL_DEVICE)")
    p.add_argument("--dtype", help="auto | float16 | bfloat16 | float32 (TTSPOOL_DTYPE)")
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
    s.add_argument("--wait", action="store_true", help="wait for the result")
    s.add_argument("--timeout", type=float, default=600.0)
    s.add_argument("--json", action="store_true")

    st = sub.add_parser("status", help="print a job's status")
    st.add_argument("job_id")
    st.add_argument("--json", action="store_true")

    w = sub.add_parser("worker", help="run one GPU worker")
    _add_engine_flags(w)
    w.add_argument("--loglevel", default="INFO")

    r = sub.add_parser("run", help="run the whole pipeline locally on the example jobs")
    _add_engine_flags(r)
    r.add_argument("--jobs", type=Path, help="JSONL file of jobs (default: the shipped examples)")
    r.add_argument("--out", type=Path, default=Path("out"), help="output folder when no storage is configured")
    r.add_argument("--timeout", type=float, default=3600.0)
    return ap


def _print_status(st: Any, as_json: bool) -> None:
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
    }
    client = Client(settings)
    try:
        job_id = client.submit({k: v for k, v in job.items() if v is not None})
        if not args.wait:
            print(json.dumps({"id": job_id}) if args.json else job_id)
            return 0
        st = client.wait([job_id], timeout=args.timeout)[0]
        _print_status(st, args.json)
        return 0 if st.status == "SUCCESS" else 1
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        if args.command == "submit":
            return _submit(args, settings)
        if args.command == "status":
            from .producer import Client

            client = Client(settings)
            try:
                _print_status(client.status(args.job_id), args.json)
            finally:
                client.close()
            return 0
        if args.command == "worker":
            from workers.worker import run_worker

            run_worker(settings, args.loglevel.upper())
            return 0
        if args.command == "run":
            from .local_run import run_local

            return run_local(settings, args.jobs, args.out, args.timeout)
    except (JobValidationError, ValueError, FileNotFoundError) as err:
        print(f"ttspool: error: {err}", file=sys.stderr)
        return 2
    except TimeoutError as err:
        print(f"ttspool: timeout: {err}", file=sys.stderr)
        return 3
    except RuntimeError as err:
        print(f"ttspool: error: {err}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
