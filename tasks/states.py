"""Job and book states: one spelling for the producer, the worker, books and the CLI.

Values are Celery's state names where Celery has one (a job's state is its result
record's), so a plain Celery client reads the same words; StrEnum members compare and
serialize as those strings.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    PENDING = "PENDING"  # enqueued (or unknown id)
    STARTED = "STARTED"  # in a GPU batch; a book: some segments done
    ASSEMBLING = "ASSEMBLING"  # a book: every segment done, the file being joined
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    EXPIRED = "EXPIRED"  # its deadline passed before it ran


TERMINAL = frozenset({JobState.SUCCESS, JobState.FAILURE, JobState.EXPIRED})
