"""What a user sees when something is wrong: one line on stderr, `ttspool: error: ...`,
and the exit status of the error's kind (1 failure, 2 bad input or settings, 3 timeout)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage import StorageError
from tasks.errors import SettingsError, TtspoolError, UsageError
from tasks.schema import JobValidationError
from tests.conftest import run_cli
from tests.test_doctor import closed_port


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_")}
    return env | extra


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ttspool: error: "), stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("args", [("status", "some-job"), ("submit", "Hello.")])
def test_a_broker_that_is_down_is_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    proc = run_cli(_env(TTSPOOL_BROKER_URL=url, TTSPOOL_STORAGE_URL=tmp_path.as_uri()), *args, timeout=120)
    assert proc.returncode == 1
    line = _one_line(proc.stderr)
    assert url in line and "Connection refused" in line


def test_a_bad_setting_is_one_line_and_exit_2() -> None:
    proc = run_cli(_env(TTSPOOL_MAX_BATCH="lots"), "status", "x")
    assert proc.returncode == 2
    assert _one_line(proc.stderr) == "ttspool: error: TTSPOOL_MAX_BATCH must be an integer, got 'lots'"


def test_one_error_family() -> None:
    from storage.models.fetch_http import FetchError
    from storage.models.manifest import ManifestError
    from workers.engine.engine_error import EngineError

    for err in (StorageError, FetchError, ManifestError, EngineError, JobValidationError, SettingsError):
        assert issubclass(err, TtspoolError), err
    # Bad input exits 2 and stays a ValueError for callers that catch that.
    for err in (ManifestError, JobValidationError, SettingsError):
        assert issubclass(err, UsageError) and issubclass(err, ValueError) and err.exit_code == 2
