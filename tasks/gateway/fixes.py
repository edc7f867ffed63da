"""What the gateway tells a client to do about an error the library raised in words that
fit any surface: the request to send (the CLI names its commands, tasks/cli/fixes.py)."""

from __future__ import annotations

from ..schema import TextTooLong
from ..voices import fix_of
from .speech import MAX_INPUT_CHARS


def http_fix(err: BaseException) -> str:
    """The end of the error's message: how to fix it over HTTP, or ""."""
    fix = fix_of(err)
    if fix is not None:
        if fix.action == "add":
            return " (POST /v1/voices; GET /v1/voices lists them)"
        return ' (POST /v1/voices with "replace": true)'
    if isinstance(err, TextTooLong):
        return (f"; POST /v1/audio/speech takes input of up to {MAX_INPUT_CHARS} characters and splits it into "
                "jobs itself")
    return ""
