"""`ttspool book` and `ttspool submit-file`: the long-form and bulk producer commands."""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..job_records import audio_key
from ..schema import BOOK_FORMAT_ALIASES, BOOK_FORMATS, JobSpec
from ..settings import Settings, redact_url
from ..states import JobState
from .common import producer, voice_arg
from .fixes import cli_fix

if TYPE_CHECKING:
    from storage import Storage

    from ..book import BookStatus
    from ..producer import Client


def add_commands(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("book", help="synthesize a long text file as one audio file (+ manifest, SRT)")
    b.add_argument("file", type=Path, help="UTF-8 text file")
    b.add_argument("--voice", type=voice_arg, default=JobSpec.model_fields["voice"].default,
                   help="voice name (ttspool voice list), speaker seed, or ChatTTS speaker string")
    b.add_argument("--seed", type=int, default=JobSpec.model_fields["seed"].default,
                   help="sampling seed of every segment")
    b.add_argument("--speed", type=int, default=JobSpec.model_fields["speed"].default,
                   help="speaking speed of every segment, 0-9")
    b.add_argument("--pause-ms", type=int, default=300, help="silence between segments")
    b.add_argument("--out-format", choices=(*BOOK_FORMATS, *BOOK_FORMAT_ALIASES), default="wav",
                   help="the book's audio: WAV PCM16, FLAC or Ogg Opus, as jobs name them (ogg: opus)")
    b.add_argument("--max-segment-s", type=float, default=30.0, help="longest predicted segment (1-30 s)")
    b.add_argument("--max-tokens", type=int, help="cap on GPT steps per segment")
    b.add_argument("--tenant", help="the tenant the segments are submitted for (its rate limit and voices)")
    b.add_argument("--lang", choices=["auto", "en", "zh"], help="language numbers and symbols are read in")
    b.add_argument("--no-wait", action="store_true", help="print the book id and return")
    b.add_argument("--timeout", type=float, default=86400.0, help="seconds to wait for the book")
    _add_output_flags(b)
    b.set_defaults(handler=_book)

    f = sub.add_parser("submit-file", help="submit one job per line of a JSONL file")
    f.add_argument("file", type=Path, help="UTF-8 JSONL: one job object per line (blank lines are skipped)")
    f.add_argument("--strict", action="store_true", help="enqueue nothing when any line is invalid")
    f.add_argument("--wait", action="store_true", help="wait for every job")
    f.add_argument("--results", type=Path, help="write one JSON line per job (id, status, url, duration)")
    f.add_argument("--timeout", type=float, default=86400.0, help="with --wait: seconds to wait for every job")
    _add_output_flags(f)
    f.set_defaults(handler=_submit_file)


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON: one object per book or job")
    p.add_argument("--presign", type=int, metavar="SECONDS", help="print presigned HTTPS URLs for S3 results")
    p.add_argument("--storage-url", help="where the worker stores results (TTSPOOL_STORAGE_URL), for --presign")


class _Presigner:
    def __init__(self, settings: Settings, seconds: int | None) -> None:
        self.seconds = seconds
        self.storage: Storage | None = None
        if seconds is not None:
            from storage import storage_for

            self.storage = storage_for(settings)
            if not settings.storage_url.startswith("s3://"):
                # Said once, up front: a local folder's file:// URLs are printed as they are.
                print(f"ttspool: note: --presign applies to S3 storage; {redact_url(settings.storage_url)} "
                      "is a local folder, so its file:// URLs are printed as they are", file=sys.stderr)

    def __call__(self, url: str | None) -> str | None:
        if url is None or self.storage is None or self.seconds is None:
            return url
        try:
            key = audio_key(self.storage.base_url, url)
        except ValueError:
            # Results are already in hand at this point (perhaps after hours): keep them.
            print(f"ttspool: warning: {url} is not in storage {self.storage.base_url}; not presigned",
                  file=sys.stderr)
            return url
        return self.storage.presigned_url(key, self.seconds)


# -- book ---------------------------------------------------------------------------


def _book(args: argparse.Namespace, settings: Settings) -> int:
    from ..book import submit_book

    text = args.file.read_text(encoding="utf-8")
    if args.out_format in BOOK_FORMAT_ALIASES:
        print(f"ttspool: note: --out-format {args.out_format} is called {BOOK_FORMAT_ALIASES[args.out_format]} now "
              "(Ogg Opus, the jobs' name for it)", file=sys.stderr)
    presign = _Presigner(settings, args.presign)
    job = {k: v for k, v in (("max_tokens", args.max_tokens), ("tenant", args.tenant), ("lang", args.lang))
           if v is not None}
    client = producer(settings)
    try:
        book_id = submit_book(client, text, voice=args.voice, seed=args.seed, speed=args.speed,
                              pause_ms=args.pause_ms, out_format=args.out_format, job=job,
                              max_segment_s=args.max_segment_s)
        if args.no_wait:
            print(json.dumps({"id": book_id}) if args.json else book_id)
            return 0
        try:
            st = _wait_with_bar(client, book_id, args.timeout)
        except TimeoutError:
            raise TimeoutError(f"book {book_id} not finished after {args.timeout:.0f} s; it goes on: "
                               f"`ttspool status {book_id}` tells how it ends") from None
        _print_book(st, args.json, presign, final=True)
        return 0 if st.status == JobState.SUCCESS else 1
    finally:
        client.close()


def _wait_with_bar(client: Client, book_id: str, timeout: float) -> BookStatus:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..book import wait_book

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("segments"),
               TextColumn("{task.fields[minutes]:.1f} min audio"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(JobState.PENDING, total=None, minutes=0.0)

        def show(st: BookStatus) -> None:
            bar.update(task, description=st.status, total=st.segments, completed=st.done + st.failed,
                       minutes=st.audio_s / 60)

        return wait_book(client.redis, book_id, timeout=timeout, on_progress=show)


def _print_book(st: BookStatus, as_json: bool, presign: _Presigner, final: bool) -> None:
    urls = {"url": presign(st.url), "manifest_url": presign(st.manifest_url), "srt_url": presign(st.srt_url)}
    if as_json:
        print(json.dumps({**(st.to_dict() if final else st.progress_dict()), **urls}))
        return
    line = f"{st.id} {st.status} {st.done}/{st.segments} segments, {st.audio_s / 60:.1f} min audio"
    if st.duration_s is not None:
        line += f"\n  audio     {st.duration_s:.2f}s {urls['url']}\n  manifest  {urls['manifest_url']}\n  subtitles {urls['srt_url']}"
    if st.error:
        line += f"\n  error: {st.error}"
    print(line)


def print_book_status(client: Client, book_id: str, as_json: bool) -> bool:
    """For `ttspool status`: print a book's progress; False when `book_id` is no book."""
    from ..book import book_status, is_book_id

    st = book_status(client.redis, book_id) if is_book_id(book_id) else None
    if st is None:
        return False
    _print_book(st, as_json, _Presigner(client.settings, None), final=False)
    return True


# -- submit-file --------------------------------------------------------------------


def read_jobs(path: Path) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    """Valid jobs as (line number, spec), and (line number, error) per invalid line. Lines
    and columns count from 1, columns in characters, as editors show them."""
    from ..schema import JobValidationError, parse_job

    jobs: list[tuple[int, Any]] = []
    errors: list[tuple[int, str]] = []
    # Bytes, so that a line that is not UTF-8 is one invalid line, not the end of the file.
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                # Without its line end: a line cut short is then wrong at its own end, not
                # at "line 2, column 1" of the decoder's view.
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                column = len(raw[:err.start].decode("utf-8")) + 1
                errors.append((n, f"line {n}, column {column}: not UTF-8 (byte 0x{raw[err.start]:02x})"))
                continue
            if not line.strip():
                continue
            try:
                jobs.append((n, parse_job(json.loads(line))))
            except json.JSONDecodeError as err:
                errors.append((n, f"line {n}, column {err.colno}: not JSON ({err.msg})"))
            except JobValidationError as err:
                errors.append((n, f"line {n}: {err}{cli_fix(err)}"))
    return jobs, errors


def _submit_file(args: argparse.Namespace, settings: Settings) -> int:
    jobs, errors = read_jobs(args.file)
    timed_out = ""
    client = producer(settings)
    try:
        # A line naming a voice the library does not have is an invalid line like any other.
        unknown = client.unknown_voices(spec for _, spec in jobs)
        errors += [(n, f"line {n}: invalid job: voice: {unknown[name]}{cli_fix(unknown[name])}")
                   for n, spec in jobs if (name := spec.voice_name) in unknown]
        jobs = [(n, spec) for n, spec in jobs if spec.voice_name not in unknown]
        errors.sort(key=lambda e: e[0])
        for _, err in errors:
            print(f"ttspool: {args.file}: {err}", file=sys.stderr)
        if errors and args.strict:
            print(f"ttspool: {len(errors)} invalid line(s); --strict: nothing enqueued", file=sys.stderr)
            return 2
        presign = _Presigner(settings, args.presign)
        submitted = client.submit_many_report([spec for _, spec in jobs])
        ids = submitted.ids
        # Ids submitted before (a rerun of the same file) are not enqueued again.
        print(f"ttspool: enqueued {len(submitted.new)} job(s), {submitted.existing} already submitted, "
              f"{len(errors)} invalid line(s)", file=sys.stderr)
        if args.wait:
            try:
                statuses = client.wait(ids, timeout=args.timeout)
            except TimeoutError as err:
                # Every job's id and where it is now: the rows say which to ask about later.
                timed_out = str(err)
                statuses = [client.status(job_id) for job_id in ids]
            rows = [{"line": n, **st.to_dict(), "url": presign(st.url)} for (n, _), st in zip(jobs, statuses)]
        else:
            fresh = set(submitted.new)
            rows = [{"line": n, "id": job_id, "status": JobState.PENDING, "new": job_id in fresh}
                    for (n, _), job_id in zip(jobs, ids)]
    finally:
        client.close()
    if args.results:
        with args.results.open("w", encoding="utf-8") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
    for row in rows:
        print(json.dumps(row) if args.json else " ".join(str(row.get(k) or "") for k in ("id", "status", "url")).rstrip())
    failed = sum(row["status"] != JobState.SUCCESS for row in rows) if args.wait else 0
    if args.wait:
        print(f"ttspool: {len(rows) - failed} succeeded, {failed} did not", file=sys.stderr)
    if timed_out:
        raise TimeoutError(f"{timed_out}; the ids above go on: `ttspool status ID` tells how each ends")
    return 1 if errors or failed else 0
