"""The field lists the docs show are the code's: README's `ttspool status --json`,
docs/BULK.md's results lines, and the queues a worker consumes."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from tasks.producer import JobStatus
from tasks.settings import WORKER_QUEUES

ROOT = Path(__file__).resolve().parents[1]
STATUS_FIELDS = {f.name for f in dataclasses.fields(JobStatus)}


def _names(braces: str) -> set[str]:
    return set(re.findall(r'"(\w+)"', braces))


def test_readme_status_fields_are_job_status() -> None:
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"^ttspool status \S+ --json\s+# (\{.*\})$", readme, re.M)
    assert line is not None, "README's `ttspool status ... --json` example is gone"
    assert _names(line[1]) == STATUS_FIELDS


def test_bulk_results_fields_are_the_line_and_job_status() -> None:
    bulk = " ".join((ROOT / "docs" / "BULK.md").read_text().split())
    waited = re.search(r"with `--wait`: `(\{[^}]*\})`", bulk)
    assert waited is not None, "docs/BULK.md no longer lists the fields of a results line"
    assert _names(waited[1]) == {"line"} | STATUS_FIELDS


def test_readme_names_every_queue_a_worker_consumes() -> None:
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{queue}`" in readme for queue in WORKER_QUEUES)
