"""`ttspool run`: the whole pipeline on one machine, for a first look.

Starts a throwaway Redis when no broker is configured, runs one worker process,
submits the example jobs (or a JSONL file of jobs), waits, and prints where the WAVs
are. Everything it started is stopped before it returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from .local_redis import LocalRedis
from ..producer import Client, JobStatus
from ..polling import poll
from ..settings import Settings
from ..states import JobState
from .worker_process import check_alive, running_worker

EXAMPLES = Path(__file__).parents[1] / "examples" / "jobs.jsonl"


def load_jobs(path: Path) -> list[dict[str, Any]]:
    jobs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                jobs.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
    return jobs


def child_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child (a worker) that must see exactly `settings`, flags
    included, not a hand-picked subset: this process' variables without any TTSPOOL_*
    one, the settings' own, then `extra`. Two malloc arenas unless set otherwise, as in
    the image (deploy/docker/Dockerfile says why)."""
    env = {"MALLOC_ARENA_MAX": "2"} | {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_")}
    env |= settings.to_env()
    return env | dict(extra or {})


def fetch_model_first(settings: Settings) -> None:
    """The model into this node's cache before any worker starts, when a worker would fetch
    it: a source that cannot be reached ends the command here, in one line naming the ways
    on, instead of a worker that starts, fails and takes the command down half a minute later.

    A mirror is probed with one unretried request first (the hub's own fetch does that);
    the download itself keeps its retries, for a flaky network."""
    from storage.models.cache import complete_model, fetch_model, model_dir
    from storage.models.fetch_http import FetchError, HttpPolicy
    from storage.models.manifest import OFFICIAL_MODEL
    from storage.models.sources import SourceUnreachable, open_source

    model, source = settings.model, settings.model_source
    # What workers.engine.assets.resolve loads without fetching: a folder, a local copy
    # of the official weights, a random model built on this node.
    if "/" in model or (model == OFFICIAL_MODEL and settings.model_dir) or (source is None and model != OFFICIAL_MODEL):
        return
    if complete_model(model_dir(settings.cache_path, model, settings.model_revision)):
        return
    if source is not None:
        try:
            open_source(source, settings.model_revision, HttpPolicy(attempts=1), settings.s3_endpoint_url).manifest()
        except FetchError as err:
            raise SourceUnreachable(source, str(err)) from None
    fetch_model(source or "hf", settings.cache_path, model=model, revision=settings.model_revision,
                pubkey=settings.model_pubkey_path, s3_endpoint_url=settings.s3_endpoint_url)


def _wait(client: Client, ids: list[str], worker: subprocess.Popen[bytes], timeout: float) -> list[JobStatus]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    done: dict[str, JobStatus] = {}
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as progress:
        bar = progress.add_task("synthesizing", total=len(ids))

        def step() -> list[JobStatus] | None:
            check_alive(worker, None)
            for jid in ids:
                if jid not in done and (st := client.status(jid)).done:
                    done[jid] = st
            progress.update(bar, completed=len(done))
            return [done[j] for j in ids] if len(done) == len(set(ids)) else None

        return poll(step, timeout=timeout, every=0.25,
                    timed_out=lambda: f"{len(set(ids)) - len(done)} job(s) unfinished after {timeout:.0f} s")


def run_local(settings: Settings, jobs_file: Path | None, out_dir: Path, timeout: float) -> int:
    jobs = load_jobs(jobs_file or EXAMPLES)
    fetch_model_first(settings)
    redis_server = None
    if "broker_url" not in settings.explicit:
        redis_server = LocalRedis().start()
        settings = settings.override(broker_url=redis_server.url)
        print(f"started a local Redis on {redis_server.url}", file=sys.stderr)
    if "storage_url" not in settings.explicit:
        out_dir.mkdir(parents=True, exist_ok=True)
        settings = settings.override(storage_url=out_dir.resolve().as_uri())
    # A one-off local run serves no metrics unless asked: port 9808 may be a real worker's.
    if "metrics_port" not in settings.explicit:
        settings = settings.override(metrics_port=0)
    try:
        # Its log goes to this process' own output, where the user looks.
        with running_worker(child_env(settings), loglevel="WARNING") as worker:
            client = Client(settings)
            try:
                ids = client.submit_many(jobs)
                results = _wait(client, ids, worker, timeout)
            finally:
                client.close()
    finally:
        if redis_server is not None:
            redis_server.close()
    failed = 0
    for st in results:
        if st.status == JobState.SUCCESS:
            print(f"{st.id}: {st.duration_s:.2f} s  {st.url}")
        else:
            failed += 1
            print(f"{st.id}: {st.status}  {st.error}")
    if settings.storage_url.startswith("file://"):
        print(f"WAV files are under {settings.storage_url.removeprefix('file://')}")
    return 1 if failed else 0
