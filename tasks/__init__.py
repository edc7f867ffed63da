"""The queue contract, torch-free: settings, the Celery app, the job schema, the producer API.

The names below load on first use, so that importing one contract module (settings,
errors, states) from storage or the scheduler does not pull in Celery.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Client": "producer", "JobStatus": "producer", "JobSpec": "schema", "JobValidationError": "schema",
    "parse_job": "schema", "QUEUES": "settings", "TASK_NAME": "settings", "Settings": "settings",
    "JobState": "states",
}
__all__ = sorted(_EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tasks' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
