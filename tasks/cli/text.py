"""`ttspool normalize`: the spoken form of a text, without the queue or torch."""

from __future__ import annotations

import argparse
import json
import sys

from ..settings import Settings


def add_commands(sub: argparse._SubParsersAction) -> None:
    n = sub.add_parser("normalize", help="print what the model would be given to speak for TEXT")
    n.add_argument("text", help="the text as written; - reads it from standard input")
    n.add_argument("--lang", choices=["auto", "en", "zh"], default="auto",
                   help="language numbers and symbols are read in (auto: decided span by span)")
    n.add_argument("--json", action="store_true",
                   help='print {"text", "spoken_text", "lang", "dropped"} (dropped: the characters left out, '
                        'each once; "" when none)')
    n.set_defaults(handler=_normalize)


def _normalize(args: argparse.Namespace, settings: Settings) -> int:
    from ..schema import parse_job
    from ..text.frontend import FrontEnd

    text = sys.stdin.read() if args.text == "-" else args.text
    # The job schema's clean-up first (markup, whitespace, length), as a job would get it.
    job = parse_job({"text": text, "lang": args.lang})
    spoken = FrontEnd.from_settings(settings).speak(job.text, job.lang)
    if args.json:
        print(json.dumps({"text": spoken.text, "spoken_text": spoken.spoken_text, "lang": spoken.lang,
                          "dropped": spoken.dropped}, ensure_ascii=False))
    else:
        print(spoken.spoken_text)
    if spoken.dropped:
        print(f"ttspool: warning: no reading for {spoken.dropped!r}; left out", file=sys.stderr)
    return 0
