"""The worker's batch function in process, without a model or a broker: a fake engine
that keeps Engine.stream's contract, and stand-ins for the broker's side of the held
messages and for task events (tests/test_worker_parts.py, tests/test_worker_policy.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from storage import storage_for
from tasks.celery_app import make_app
from tasks.cli.local_redis import LocalRedis
from tasks.settings import Settings
from workers.engine.requests import BatchStream, Event, RowsFree, SynthRequest, SynthResult
from workers.pipeline.runner import BatchRunner
from workers.pipeline.task_events import TaskEvents

from .conftest import Request

STEP_S = 0.03


class FakeEngine:
    """Engine.stream's contract without a model: a row takes `length(request)` steps (by
    default one per word of its text), rows end in step order, express rows step alone
    while there are any (the engine's express lane), and free rows are offered after
    each step. A step takes `step_s`, as a GPU's does: storage lookups of new jobs, which
    run beside the batch, are back a step later."""

    sample_rate = 24_000
    model_id = "fake-engine"

    def __init__(self, length: Callable[[SynthRequest], int] = lambda req: len(req.text.split()),
                 step_s: float = STEP_S) -> None:
        self.length = length
        self.step_s = step_s
        self.joined: dict[str, int] = {}  # by text: steps the batch had taken when its row joined
        self.batches: list[list[str]] = []  # the texts of each batch's rows, in joining order
        self.express: dict[str, bool] = {}  # by text: whether its row ran in the express lane
        self.after_step: Callable[[int], None] = lambda step: None

    def normalize(self, text: str) -> str:
        return text

    def speaker(self, voice: Any) -> None:
        return None

    def stream(self, requests: Sequence[SynthRequest], max_rows: int = 0, keep_finished: bool = False) -> BatchStream:
        return BatchStream(lambda inbox: self._rows(requests, inbox, max_rows))

    def _rows(self, requests: Sequence[SynthRequest], inbox: list[SynthRequest], max_rows: int) -> Iterator[Event]:
        grows, max_rows = bool(max_rows), max_rows or len(requests)
        texts: list[str] = []
        self.batches.append(texts)
        rows: list[list[Any]] = []  # [index, steps left, express]
        taken = 0  # steps the batch has taken

        def admit(reqs: Sequence[SynthRequest]) -> None:
            for req in reqs:
                rows.append([len(texts), self.length(req), req.express])
                self.express[req.text] = req.express
                self.joined[req.text] = taken
                texts.append(req.text)

        admit(requests)
        for step in range(10_000):  # bounded: every row ends within its length
            if not rows:
                return
            time.sleep(self.step_s)
            taken += 1
            for row in [r for r in rows if r[2]] or rows:
                row[1] -= 1
            for row in [r for r in rows if r[1] <= 0]:
                rows.remove(row)
                yield row[0], SynthResult(np.zeros(2400, dtype=np.float32), 1)
            self.after_step(step)
            if grows and len(rows) < max_rows:
                yield RowsFree(max_rows - len(rows))
                admit(inbox)
                inbox.clear()
        raise AssertionError("rows never ended")


class Offered:
    """The broker's side of the held messages (workers.broker.held_messages), as a test
    drives it: each `take_arrivals` hands out the next list offered; settles are kept."""

    def __init__(self) -> None:
        self.offered: list[list[Request]] = []
        self.settled: list[str] = []
        self.on_settle: Callable[[str], None] = lambda job_id: None

    def take_arrivals(self) -> list[Any]:
        return self.offered.pop() if self.offered else []

    def settle(self, job_id: str, kwargs: Any) -> None:
        self.settled.append(job_id)
        self.on_settle(job_id)


class Sent(TaskEvents):
    """Task events as sent, kept."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        super().__init__(lambda event_type, **fields: self.sent.append((event_type, fields)))


def make_runner(own_broker: LocalRedis, root: Path, events: TaskEvents | None = None,
                engine: FakeEngine | None = None, **env: str) -> tuple[BatchRunner, FakeEngine]:
    settings = Settings.from_env({"TTSPOOL_BROKER_URL": own_broker.url, "TTSPOOL_STORAGE_URL": root.as_uri(),
                                  "TTSPOOL_MAX_WAIT_MS": "0", "TTSPOOL_MAX_BATCH": "2", **env})
    engine = engine if engine is not None else FakeEngine()
    runner = BatchRunner(make_app(settings), engine, storage_for(settings), settings,  # type: ignore[arg-type]
                         messages=Offered(), events=events)
    return runner, engine


def offered(runner: BatchRunner) -> Offered:
    assert isinstance(runner.messages, Offered)
    return runner.messages
