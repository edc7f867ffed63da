"""Waiting for something that is not there yet, with a deadline."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def poll(step: Callable[[], T | None], *, timeout: float, every: float, timed_out: Callable[[], str]) -> T:
    """Call `step` every `every` seconds until it returns something other than None, and
    return that; `step` may raise to stop early. After `timeout` seconds, TimeoutError
    with the message `timed_out()` gives (asked then, so it can say how far it got)."""
    deadline = time.monotonic() + timeout
    while True:
        got = step()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(timed_out())
        time.sleep(every)
