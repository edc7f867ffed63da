"""`ttspool submit` and `ttspool status`: one job at a time."""

from __future__ import annotations

import argparse
import json

from ..errors import JobUnknown
from ..schema import AUDIO_FORMATS
from ..settings import Settings
from ..states import JobState
from .common import print_status, producer, voice_arg


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("submit", help="enqueue one job and print its id")
    s.add_argument("text")
    s.add_argument("--voice", type=voice_arg, help="voice name (ttspool voice list), integer speaker seed, or ChatTTS speaker string")
    s.add_argument("--seed", type=int)
    s.add_argument("--speed", type=int)
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-p", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--priority", choices=["realtime", "bulk"])
    s.add_argument("--job-id")
    s.add_argument("--ttl", type=float, dest="ttl_s", help="seconds after which an unstarted job expires")
    s.add_argument("--lang", choices=["auto", "en", "zh"], help="language numbers and symbols are read in")
    s.add_argument("--format", choices=AUDIO_FORMATS, help="output format (default wav: 24 kHz PCM16)")
    s.add_argument("--no-normalize", dest="normalize", action="store_false", default=None,
                   help="send the text as written (it was normalized upstream)")
    s.add_argument("--wait", action="store_true", help="wait for the result")
    s.add_argument("--timeout", type=float, default=600.0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=_submit)

    st = sub.add_parser("status", help="print a job's status",
                        description="Print a job's (or a book's) status. Exit status 0; 4 when no job has the "
                                    "id; 1 when Redis cannot be reached; 2 for a string that is not a job id.")
    st.add_argument("job_id", help="an id `submit` printed (TENANT:ID for a tenant's job)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(handler=_status)


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    job = {
        "text": args.text, "voice": args.voice, "seed": args.seed, "speed": args.speed,
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "max_tokens": args.max_tokens, "priority": args.priority, "job_id": args.job_id,
        "ttl_s": args.ttl_s, "lang": args.lang, "normalize": args.normalize,
        "format": args.format,
    }
    client = producer(settings)
    try:
        job_id = client.submit({k: v for k, v in job.items() if v is not None})
        if not args.wait:
            print(json.dumps({"id": job_id}) if args.json else job_id)
            return 0
        try:
            st = client.wait([job_id], timeout=args.timeout)[0]
        except TimeoutError:
            # Where the job is, and its id to ask again with: it runs on.
            print_status(client.status(job_id), args.json)
            raise TimeoutError(f"job {job_id} not finished after {args.timeout:.0f} s; it stays queued: "
                               f"`ttspool status {job_id}` tells how it ends") from None
        print_status(st, args.json)
        return 0 if st.status == JobState.SUCCESS else 1
    finally:
        client.close()


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from .bulk import print_book_status
    from .common import producer

    # With the store: a job past the result window is read from its durable record.
    client = producer(settings)
    try:
        if not print_book_status(client, args.job_id, args.json):
            st = client.lookup(args.job_id)
            if st is None:
                raise JobUnknown(f"no job {args.job_id!r}: nobody submitted it, or its result and record are gone "
                                 "(a tenant's job is TENANT:ID)")
            print_status(st, args.json)
    finally:
        client.close()
    return 0
