"""What the CLI tells its user to do about an error the library raised in words that fit
any surface: the command to run (the gateway names its routes, tasks/gateway/fixes.py)."""

from __future__ import annotations

from ..schema import TextTooLong
from ..voices import fix_of


def cli_fix(err: BaseException) -> str:
    """The end of the error's line: how to fix it on the command line, or ""."""
    fix = fix_of(err)
    if fix is not None:
        tenant = f" --tenant {fix.tenant}" if fix.tenant is not None else ""
        if fix.action == "add":
            return f" (`ttspool voice add {fix.name}{tenant} ...`; `ttspool voice list{tenant}` lists them)"
        return f" (`ttspool voice add {fix.name}{tenant} --replace ...`)"
    if isinstance(err, TextTooLong):
        return "; `ttspool book FILE` speaks a long text as one audio file, split into jobs at sentence ends"
    return ""
